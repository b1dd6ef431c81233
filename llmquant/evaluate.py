"""Perplexity under the papers' protocol (methods-spec 1.8) and KL divergence against a reference.

Windows: n = floor(tokens / seqlen) non-overlapping windows [k*seqlen, (k+1)*seqlen), tail dropped,
no extra BOS per window (optionally only the first `max_windows`). Per window, the mean cross-entropy
of its seqlen - 1 next-token predictions times seqlen is its NLL; PPL = exp(sum NLL / (n * seqlen)),
i.e. the exponential of the mean per-window mean loss, exactly as the reference code computes it.

KL divergence (as llama.cpp's perplexity tool reports it): over the same windows, the reference
model (usually the full-precision one) and the evaluated model see the same tokens; at each of the
seqlen - 1 predicted positions of a window, KL(P_ref || P) = sum_v P_ref(v) (log P_ref(v) - log P(v))
in nats, from float32 log-softmaxes of both logits (the per-position values are then averaged in
float64 over every position of every window). Top-1 agreement is the fraction of positions where both
logits have the same argmax. The evaluated model's PPL comes from the same forward pass; the
reference's PPL on the same windows comes for free. Both models are resident at once.

A reference cache makes repeated comparisons against one reference cheap (`make bench` compares
every recipe with the same fp model). It is saved once per (reference files, tokens, seqlen, windows,
dtype, device), by the first `--kl` run against that reference or by evaluating the reference itself
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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

KL_CHUNK = 128  # positions per chunk of the KL computation (bounds its float32 temporaries)
CACHE_TENSOR = "head_inputs"
CACHE_HEADER = "llmquant.kl_reference"
CACHE_FINGERPRINT = "llmquant.head_sha256"
CACHE_VERSION = 2  # 2: the reference's statistics beside its output-layer inputs


@dataclass
class DivergenceResult:
    """The evaluated model against the reference, over every predicted position of every window."""

    kl: float  # mean KL(P_ref || P) in nats
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float  # fraction of positions where the argmaxes agree
    positions: int
    reference_ppl: float  # the reference model's PPL on the same windows
    window_kl: list[float]  # mean KL of each window
    reference_cache: str | None = None  # None, "built" or "used"
    computed_from: str = "logits"  # "logits" (both log-softmaxes), "statistics" (the cached reference's) or "mixed"


@dataclass
class PerplexityResult:
    ppl: float
    windows: int
    seqlen: int
    tokens_evaluated: int
    seconds: float
    window_nll: list[float]  # mean NLL of each window (for comparisons and bootstrap error bars)
    divergence: DivergenceResult | None = None


def window_count(tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    n = tokens // seqlen
    return min(n, max_windows) if max_windows else n


def kl_divergence(
    ref_logits: torch.Tensor, logits: torch.Tensor, chunk: int = KL_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(P_ref || P) in nats (float64 tensor [positions]) and argmax agreement (bool
    [positions]) for logits of shape [positions, vocab]; the math is float32 log-softmax."""
    if ref_logits.shape != logits.shape or ref_logits.dim() != 2:
        raise ValueError(f"logits of shapes {tuple(ref_logits.shape)} and {tuple(logits.shape)}: expected one [positions, vocab]")
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    agree = (ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)).cpu()
    return kl_from_log_probs(ref_logp, logp, chunk), agree


def kl_from_log_probs(ref_logp: torch.Tensor, logp: torch.Tensor, chunk: int = KL_CHUNK) -> torch.Tensor:
    """sum_v exp(ref_logp) * (ref_logp - logp) per row of [positions, vocab] log-probabilities, in
    chunks of rows (bounding the temporaries); float64 result on the CPU."""
    out = []
    for start in range(0, ref_logp.shape[0], chunk):
        ref, other = ref_logp[start : start + chunk], logp[start : start + chunk]
        p = ref.exp()
        kl = (p * (ref - other)).sum(dim=-1)
        bad = kl.isnan()
        if bad.any():
            # A token the reference rules out (log P_ref = -inf) contributes 0, even where log P is -inf too.
            terms = p[bad] * (ref[bad] - other[bad])
            kl[bad] = torch.where(p[bad] > 0, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(dim=-1)
        out.append(kl.double())
    return torch.cat(out).cpu()


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
        from safetensors.torch import save_file

        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.tmp-{os.getpid()}")
        tensors = {name: torch.stack(parts).contiguous() for name, parts in self.building.items()}
        try:
            save_file(tensors, str(tmp), metadata={CACHE_HEADER: self.key_json, CACHE_FINGERPRINT: self.fingerprint or ""})
            tmp.replace(self.cache_path)
        finally:
            tmp.unlink(missing_ok=True)
        self.status = "built"
        self.building = None


def reference_key(
    source, ids: torch.Tensor, seqlen: int, windows: int, model: nn.Module | torch.dtype | str, device: torch.device | str
) -> dict[str, Any]:
    """What a reference cache depends on: the reference's files (path, size, modification time of its
    weights and JSON files; `source` is a models.loading.ModelSource), the exact tokens, the windows,
    and the dtype and device type it computes in."""
    if source.kind == "gguf":
        files = [Path(source.location) / source.gguf_file]
    elif source.kind == "dir":
        folder = Path(source.location)
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".gguf")]
    else:
        files = []
    entries = [["hub", source.location]] if source.kind == "hub" else []
    for path in sorted(files):
        stat = path.stat()
        entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    tokens = ids[: windows * seqlen].to("cpu", torch.int64).contiguous()
    return {
        "version": 1,
        "files": entries,
        "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        "seqlen": seqlen,
        "windows": windows,
        "dtype": str(model.dtype if isinstance(model, nn.Module) else model),  # a model, or the dtype it loads in
        "device": torch.device(device).type,
    }


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
    on_window: Callable[[int, int], None] | None = None,
    reference: Reference | None = None,
    save_as_reference: Reference | None = None,
) -> PerplexityResult:
    """PPL of `model` on the windows of `ids`; with a `reference`, also the KL divergence and top-1
    agreement of `model` against it, from the same forward passes (`result.divergence`). With
    `save_as_reference` (a Reference of `model` itself with a cache directory), the same pass also
    writes `model`'s reference cache, for later runs that compare other models with it."""
    n = window_count(ids.numel(), seqlen, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if save_as_reference is not None and save_as_reference.model is not model:
        raise ValueError("save_as_reference must be a Reference of the evaluated model")
    start = time.perf_counter()
    nlls, ref_nlls, position_kl, agreement = [], [], [], []
    windows_from_statistics = 0
    for ref in (reference, save_as_reference):
        if ref is not None:
            ref.begin(n, seqlen)
    use_statistics = reference is not None and reference.matches_head_of(model)
    head = model.get_output_embeddings()
    tap = _HeadTap(head) if head is not None and (use_statistics or save_as_reference is not None) else None
    try:
        for k in range(n):
            window = ids[k * seqlen : (k + 1) * seqlen].unsqueeze(0).to(device)
            targets = window[0, 1:]
            raw = model(window, use_cache=False).logits
            logits = raw.float()
            # cross_entropy is exactly what the reference code computes; every path uses it for the PPL.
            nlls.append(F.cross_entropy(logits[0, :-1], targets, reduction="mean").item())
            if save_as_reference is not None and tap is not None:
                save_as_reference.record(window, raw, tap)
            if reference is not None:
                if use_statistics and tap is not None and tap.logits_are_head_output(raw):
                    kl, agree, ref_nll = _divergence_from_statistics(logits[0, :-1], tap, reference.statistics(k, logits.device))
                    windows_from_statistics += 1
                else:
                    kl, agree, ref_nll = _divergence_in_full(logits[0, :-1], reference.logits(k, window), targets)
                position_kl.append(kl)
                agreement.append(agree)
                ref_nlls.append(ref_nll)
            if on_window:
                on_window(k + 1, n)
    finally:
        if tap is not None:
            tap.close()
    if save_as_reference is not None:
        save_as_reference.finish()
    divergence = None
    if reference is not None:
        reference.finish()
        kl = torch.cat(position_kl)
        divergence = DivergenceResult(
            kl=kl.mean().item(),
            kl_median=kl.median().item(),
            kl_p99=torch.quantile(kl, 0.99).item() if kl.numel() <= 16_000_000 else float("nan"),
            kl_max=kl.max().item(),
            top1=torch.cat(agreement).double().mean().item(),
            positions=kl.numel(),
            reference_ppl=math.exp(sum(ref_nlls) / n),
            window_kl=[w.mean().item() for w in position_kl],
            reference_cache=reference.status,
            computed_from="statistics" if windows_from_statistics == n else "logits" if windows_from_statistics == 0 else "mixed",
        )
    ppl = math.exp(sum(nlls) / n)  # = exp(sum(nll_k * seqlen) / (n * seqlen))
    return PerplexityResult(ppl, n, seqlen, n * seqlen, time.perf_counter() - start, nlls, divergence)


def _divergence_in_full(
    logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-position KL and argmax agreement from both log-softmaxes, and the reference's window NLL."""
    ref_logits = ref_logits.float()
    if ref_logits.shape[-2:] != (logits.shape[0] + 1, logits.shape[1]):
        raise ValueError(
            f"the reference's logits have shape {tuple(ref_logits.shape)}, the model's {(1, logits.shape[0] + 1, logits.shape[1])} "
            "(different vocabularies?)"
        )
    ref_logits = ref_logits[0, :-1]
    logp = F.log_softmax(logits, dim=-1)
    ref_logp = F.log_softmax(ref_logits, dim=-1)
    ref_nll = F.nll_loss(ref_logp, targets, reduction="mean").item()
    agree = (ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)).cpu()
    return kl_from_log_probs(ref_logp, logp), agree, ref_nll


def _divergence_from_statistics(
    logits: torch.Tensor, tap: _HeadTap, stats: WindowStatistics
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The same three figures from the cached reference statistics and the model's own output-layer
    input h: KL = sum p log p - (h.m + b.p) + logsumexp(z) (module docstring)."""
    assert tap.input is not None
    hidden = tap.input[0, :-1].double()
    expected = (hidden * stats.moments.double()).sum(dim=-1) + stats.bias_terms
    kl = stats.neg_entropy - expected + torch.logsumexp(logits, dim=-1).double()
    agree = (logits.argmax(dim=-1) == stats.argmax).cpu()
    return kl.cpu(), agree, stats.nll.item()
