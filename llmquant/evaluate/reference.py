"""The KL reference and its cache (what `eval --kl` compares against).

A reference cache makes repeated comparisons against one reference cheap (`make bench` compares
every recipe with the same fp model). It is saved once per (reference files, tokens, seqlen, windows,
per-window BOS or not, dtype, device), by the first `--kl` run against that reference or by evaluating the reference itself
with `--reference-cache`, and holds per predicted position:

- the reference's statistics: its argmax, its NLL, its negative entropy sum_v p log p, and the
  "moment" m = W^T p of its distribution p through its output layer (W: vocab x hidden, plus b.p
  when the layer has a bias). For an evaluated model whose output layer is bit-identical to the
  reference's (methods leave lm_head alone, so every checkpoint of one fp model qualifies) and whose
  logits are that layer's output z = W h + b, sum_v p z_v = h.m + b.p, so
  KL(P_ref || P) = sum_v p log p - (h.m + b.p) + logsumexp(z):
  the reference costs nothing per run, and the evaluated model needs a logsumexp and an argmax, not a
  log-softmax over the vocabulary. The reference's distribution is taken in float64 (window_statistics),
  which makes this path the more accurate one: on SmolLM2 its mean KL is within ~2e-6 nats of a
  float64 computation, the float32 log-softmaxes of the full path within ~2e-5. Per-position values
  below 0 from rounding are kept as they are (clamping would bias the mean).
- the inputs of its output layer, for an evaluated model whose output layer differs: the reference's
  logits are then recomputed with the output layer alone, and the KL computed in full.

The cache is only built when the output layer's output is exactly the model's logits (no
soft-capping or other post-processing), checked on every window while building; the statistics path
checks the same of the evaluated model on every window, and falls back to the full computation if
it does not hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmquant.data.windows import eval_windows
from llmquant.safetensors_io import write_safetensors

log = logging.getLogger(__name__)

CACHE_TENSOR = "head_inputs"
CACHE_HEADER = "llmquant.kl_reference"
CACHE_FINGERPRINT = "llmquant.head_sha256"
CACHE_VERSION = 2  # 2: the reference's statistics beside its output-layer inputs


@dataclass
class WindowStatistics:
    """The reference at each predicted position of one window (module docstring)."""

    moments: torch.Tensor  # [positions, hidden] float32: W^T p
    bias_terms: torch.Tensor  # [positions] float64: b.p (zeros when the output layer has no bias)
    neg_entropy: torch.Tensor  # [positions] float64: sum_v p log p
    argmax: torch.Tensor  # [positions] int64
    nll: torch.Tensor  # [] float64: the window's mean NLL


STATISTICS = ("moments", "bias_terms", "neg_entropy", "argmax", "nll")


def window_statistics(logits: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> WindowStatistics:
    """The reference's statistics from its logits [positions, vocab] and the targets [positions].

    The distribution is taken in float64: sum_v p z_v is a difference of terms near |z| (tens of
    nats), and a float32 softmax's mass is off by ~1e-5, which would shift every KL by ~1e-4.
    With lse = logsumexp(z): p = exp(z - lse), sum p log p = sum p z - lse, NLL = lse - z_target.
    The moments' matrix product runs in float32 on the probabilities rounded to float32."""
    z = logits.double()
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse.unsqueeze(-1))
    # A token the reference rules out (z = -inf, p = 0) contributes 0, not 0 * -inf.
    expected_logit = torch.where(p > 0, p * z, torch.zeros((), dtype=p.dtype, device=p.device)).sum(dim=-1)
    bias = getattr(head, "bias", None)
    return WindowStatistics(
        moments=(p.float() @ head.weight.float()).cpu(),
        bias_terms=(p @ bias.double()).cpu() if bias is not None else torch.zeros(p.shape[0], dtype=torch.float64),
        neg_entropy=(expected_logit - lse).cpu(),
        argmax=logits.argmax(dim=-1).cpu(),
        nll=(lse - z.gather(1, targets.unsqueeze(1)).squeeze(1)).mean().cpu(),
    )


def head_fingerprint(head: nn.Module) -> str:
    """sha256 of the output layer's weight and bias as float32: equal fingerprints, equal logits for equal inputs."""
    digest = hashlib.sha256()
    for tensor in (head.weight, getattr(head, "bias", None)):
        if tensor is not None:
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


class _HeadTap:
    """A forward hook on a model's output layer keeping its input and output of the last call."""

    def __init__(self, head: nn.Module):
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.handle = head.register_forward_hook(self._hook)

    def _hook(self, _module, inputs, output) -> None:
        self.input, self.output = inputs[0], output

    def logits_are_head_output(self, logits: torch.Tensor) -> bool:
        out = self.output
        return self.input is not None and out is not None and out.shape == logits.shape and torch.equal(out, logits)

    def close(self) -> None:
        self.handle.remove()


class Reference:
    """The reference model for each evaluation window: its statistics from a cache (when the evaluated
    model's output layer matches), else its logits, from the cached inputs of its output layer or by
    running it (see the module docstring). `key` identifies what the cache depends on (reference_key).

    Building: a run without a usable cache records the statistics and head inputs of every window
    and writes the cache at the end (`finish`); `record` adds one window, from the reference's own
    forward (`logits`) or, when the reference is the evaluated model itself, from that forward.

    `model` may be a function that loads the reference: it is then called only when the cache cannot
    answer alone (no cache yet, or an evaluated model with another output layer), so a `--kl` run on
    the statistics path never loads the reference at all."""

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        cache_dir: str | Path | None = None,
        key: dict[str, Any] | None = None,
    ):
        self._model = model if isinstance(model, nn.Module) else None
        self._load = None if isinstance(model, nn.Module) else model
        self.cache_path: Path | None = None
        self.key_json = json.dumps({**(key or {}), "cache_version": CACHE_VERSION}, sort_keys=True)
        if cache_dir is not None:
            digest = hashlib.sha256(self.key_json.encode()).hexdigest()[:20]
            self.cache_path = Path(cache_dir) / f"reference-{digest}.safetensors"
        self.cached: dict[str, torch.Tensor] | None = None  # head_inputs [windows, seqlen, hidden] and STATISTICS
        self.fingerprint: str | None = None
        self.building: dict[str, list[torch.Tensor]] | None = None
        self.status: str | None = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            assert self._load is not None
            self._model = self._load()
        return self._model

    @property
    def head(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def begin(self, windows: int, seqlen: int) -> None:
        if self.cache_path is None:
            return
        self.cached = self._read(windows, seqlen)
        if self.cached is not None:
            self.status = "used"
            return
        head = self.head
        if head is None or getattr(head, "weight", None) is None:
            log.warning("the reference has no output layer to cache the inputs of; running it in full")
            return
        self.building = {name: [] for name in (CACHE_TENSOR, *STATISTICS)}
        self.fingerprint = head_fingerprint(head)

    def _read(self, windows: int, seqlen: int) -> dict[str, torch.Tensor] | None:
        assert self.cache_path is not None
        if not self.cache_path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.cache_path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in (CACHE_TENSOR, *STATISTICS)}
        except Exception as error:  # noqa: BLE001 - any damage means: rebuild it
            log.warning("reference cache %s is unreadable (%s); rebuilding it", self.cache_path, " ".join(str(error).split()))
            return None
        inputs = tensors[CACHE_TENSOR]
        if metadata.get(CACHE_HEADER) != self.key_json or inputs.dim() != 3 or tuple(inputs.shape[:2]) != (windows, seqlen):
            log.warning("reference cache %s does not match this evaluation; rebuilding it", self.cache_path)
            return None
        self.fingerprint = metadata.get(CACHE_FINGERPRINT)
        return tensors

    def matches_head_of(self, model: nn.Module) -> bool:
        """Whether `model`'s output layer is bit-identical to the cached reference's (statistics path)."""
        head = model.get_output_embeddings()
        if self.cached is None or self.fingerprint is None or head is None or getattr(head, "weight", None) is None:
            return False
        return head_fingerprint(head) == self.fingerprint

    def statistics(self, k: int, device: torch.device | str) -> WindowStatistics:
        assert self.cached is not None
        return WindowStatistics(*(self.cached[name][k].to(device) for name in STATISTICS))

    def logits(self, k: int, window: torch.Tensor) -> torch.Tensor:
        """The reference's logits [1, seqlen, vocab] for window k (token ids [1, seqlen])."""
        if self.cached is not None:
            return self.head(self.cached[CACHE_TENSOR][k].unsqueeze(0).to(window.device))
        if self.building is None:
            return self.model(window, use_cache=False).logits
        tap = _HeadTap(self.head)
        try:
            logits = self.model(window, use_cache=False).logits
        finally:
            tap.close()
        self.record(window, logits, tap)
        return logits

    def record(self, window: torch.Tensor, logits: torch.Tensor, tap: _HeadTap) -> None:
        """Adds one window to the cache being built (or stops building if the logits are post-processed)."""
        if self.building is None:
            return
        if not tap.logits_are_head_output(logits):
            log.warning("the reference's logits are not its output layer's output; not caching them")
            self.building = None
            return
        assert tap.input is not None
        stats = window_statistics(logits[0, :-1], window[0, 1:], self.head)
        self.building[CACHE_TENSOR].append(tap.input[0].detach().to("cpu", copy=True))
        for name in STATISTICS:
            self.building[name].append(getattr(stats, name))

    def finish(self) -> None:
        """Write the cache if this run built it (atomically: a partial file is never left behind)."""
        if self.building is None or self.cache_path is None or not self.building[CACHE_TENSOR]:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: torch.stack(parts).contiguous() for name, parts in self.building.items()}
        metadata = {CACHE_HEADER: self.key_json, CACHE_FINGERPRINT: self.fingerprint or ""}
        write_safetensors(self.cache_path, tensors, metadata)  # temporary name, fsync, rename
        self.status = "built"
        self.building = None


def reference_key(
    source,
    ids: torch.Tensor,
    seqlen: int,
    windows: int,
    model: nn.Module | torch.dtype | str,
    device: torch.device | str,
    bos_token_id: int | None = None,
) -> dict[str, Any]:
    """What a reference cache depends on: the reference's files (path, size, modification time of its
    weights and JSON files; `source` is a models.loading.ModelSource), the exact tokens of the windows
    the models see (BOS included: `bos_token_id` as in perplexity), the windows, the BOS choice, and
    the dtype and device type it computes in."""
    entries = [["hub", source.location]] if source.kind == "hub" else []
    for path in source.files():
        stat = path.stat()
        entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    tokens = eval_windows(ids, seqlen, windows, bos_token_id).to("cpu", torch.int64).contiguous()
    return {
        "version": 1,
        "files": entries,
        "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        "seqlen": seqlen,
        "windows": windows,
        "bos_per_window": bos_token_id is not None,
        "dtype": str(model.dtype if isinstance(model, nn.Module) else model),  # a model, or the dtype it loads in
        "device": torch.device(device).type,
    }
