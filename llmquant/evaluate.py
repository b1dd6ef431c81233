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
every recipe with the same fp model): the inputs of the reference's output layer (`lm_head`) are
saved once per (reference files, tokens, seqlen, windows, dtype, device), and later runs recompute the
reference logits with the output layer alone instead of the whole model. The cache is only built
when the output layer's output is exactly the model's logits (no soft-capping or other
post-processing), checked on every window while building.
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


class Reference:
    """The reference model's logits for each evaluation window: by running the model, or, with a
    cache file, by applying its output layer to the cached inputs of that layer (see the module
    docstring). `key` identifies what the cache depends on (reference_key builds it)."""

    def __init__(self, model: nn.Module, cache_dir: str | Path | None = None, key: dict[str, Any] | None = None):
        self.model = model
        self.cache_path: Path | None = None
        self.key_json = json.dumps(key or {}, sort_keys=True)
        if cache_dir is not None:
            digest = hashlib.sha256(self.key_json.encode()).hexdigest()[:20]
            self.cache_path = Path(cache_dir) / f"reference-{digest}.safetensors"
        self.head = model.get_output_embeddings()
        self.cached: torch.Tensor | None = None  # [windows, seqlen, hidden] when reading the cache
        self.building: list[torch.Tensor] | None = None
        self.status: str | None = None

    def begin(self, windows: int, seqlen: int) -> None:
        if self.cache_path is None:
            return
        if self.head is None:
            log.warning("the reference has no output layer to cache the inputs of; running it in full")
            return
        self.cached = self._read(windows, seqlen)
        if self.cached is not None:
            self.status = "used"
        else:
            self.building = []

    def _read(self, windows: int, seqlen: int) -> torch.Tensor | None:
        assert self.cache_path is not None
        if not self.cache_path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.cache_path), framework="pt") as handle:
                header = (handle.metadata() or {}).get(CACHE_HEADER)
                tensor = handle.get_tensor(CACHE_TENSOR)
        except Exception as error:  # noqa: BLE001 - any damage means: rebuild it
            log.warning("reference cache %s is unreadable (%s); rebuilding it", self.cache_path, " ".join(str(error).split()))
            return None
        if header != self.key_json or tensor.dim() != 3 or tuple(tensor.shape[:2]) != (windows, seqlen):
            log.warning("reference cache %s does not match this evaluation; rebuilding it", self.cache_path)
            return None
        return tensor

    def logits(self, k: int, window: torch.Tensor) -> torch.Tensor:
        """The reference's logits [1, seqlen, vocab] for window k (token ids [1, seqlen])."""
        if self.cached is not None:
            return self.head(self.cached[k].unsqueeze(0).to(window.device))
        if self.building is None:
            return self.model(window, use_cache=False).logits
        captured: dict[str, torch.Tensor] = {}

        def hook(_module, inputs, output):
            captured["input"], captured["output"] = inputs[0], output

        handle = self.head.register_forward_hook(hook)
        try:
            logits = self.model(window, use_cache=False).logits
        finally:
            handle.remove()
        head_input, head_output = captured.get("input"), captured.get("output")
        if head_input is None or head_output is None or head_output.shape != logits.shape or not torch.equal(head_output, logits):
            log.warning("the reference's logits are not its output layer's output; not caching them")
            self.building = None
        else:
            self.building.append(head_input[0].detach().to("cpu", copy=True))
        return logits

    def finish(self) -> None:
        """Write the cache if this run built it (atomically: a partial file is never left behind)."""
        if self.building is None or self.cache_path is None or not self.building:
            return
        from safetensors.torch import save_file

        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.tmp-{os.getpid()}")
        try:
            save_file({CACHE_TENSOR: torch.stack(self.building).contiguous()}, str(tmp), metadata={CACHE_HEADER: self.key_json})
            tmp.replace(self.cache_path)
        finally:
            tmp.unlink(missing_ok=True)
        self.status = "built"
        self.building = None


def reference_key(source, ids: torch.Tensor, seqlen: int, windows: int, model: nn.Module, device: torch.device | str) -> dict[str, Any]:
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
        "dtype": str(getattr(model, "dtype", "")),
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
) -> PerplexityResult:
    """PPL of `model` on the windows of `ids`; with a `reference`, also the KL divergence and top-1
    agreement of `model` against it, from the same forward passes (`result.divergence`)."""
    n = window_count(ids.numel(), seqlen, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    start = time.perf_counter()
    nlls, ref_nlls, position_kl, agreement = [], [], [], []
    if reference is not None:
        reference.begin(n, seqlen)
    for k in range(n):
        window = ids[k * seqlen : (k + 1) * seqlen].unsqueeze(0).to(device)
        targets = window[0, 1:]
        logits = model(window, use_cache=False).logits.float()
        if reference is None:
            loss = F.cross_entropy(logits[0, :-1], targets, reduction="mean")
        else:
            # cross_entropy is exactly nll_loss(log_softmax(.)): the PPL is the same number either way,
            # and each log-softmax is computed once for both the NLL and the KL.
            logp = F.log_softmax(logits[0, :-1], dim=-1)
            loss = F.nll_loss(logp, targets, reduction="mean")
            ref_logits = reference.logits(k, window).float()
            if ref_logits.shape != logits.shape:
                raise ValueError(
                    f"the reference's logits have shape {tuple(ref_logits.shape)}, the model's {tuple(logits.shape)} "
                    "(different vocabularies?)"
                )
            ref_logp = F.log_softmax(ref_logits[0, :-1], dim=-1)
            ref_nlls.append(F.nll_loss(ref_logp, targets, reduction="mean").item())
            position_kl.append(kl_from_log_probs(ref_logp, logp))
            agreement.append((ref_logits[0, :-1].argmax(dim=-1) == logits[0, :-1].argmax(dim=-1)).cpu())
            del logp, ref_logp, ref_logits
        nlls.append(loss.item())
        if on_window:
            on_window(k + 1, n)
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
        )
    ppl = math.exp(sum(nlls) / n)  # = exp(sum(nll_k * seqlen) / (n * seqlen))
    return PerplexityResult(ppl, n, seqlen, n * seqlen, time.perf_counter() - start, nlls, divergence)
