"""Perplexity under the papers' protocol (docs/methods-spec.md §1.8) and KL divergence against a reference.

Windows: n = floor(tokens / seqlen) non-overlapping windows [k*seqlen, (k+1)*seqlen), tail dropped,
no extra BOS per window (optionally only the first `max_windows`); with a `bos_token_id` (the BOS rule
of data/windows.py: the tokenizer adds BOS by default, or --bos always), window k is instead BOS +
the text tokens [k*(seqlen-1), (k+1)*(seqlen-1)). Per window, the mean cross-entropy of its
seqlen - 1 next-token predictions times seqlen is its NLL (with BOS: the predictions of its seqlen - 1
text tokens); PPL = exp(sum NLL / (n * seqlen)), i.e. the exponential of the mean per-window mean
loss, exactly as the reference code computes it.

KL divergence (as llama.cpp's perplexity tool reports it): over the same windows, the reference
model (usually the full-precision one) and the evaluated model see the same tokens; at each of the
seqlen - 1 predicted positions of a window, KL(P_ref || P) = sum_v P_ref(v) (log P_ref(v) - log P(v))
in nats, from float32 log-softmaxes of both logits (the per-position values are then averaged in
float64 over every position of every window). Top-1 agreement is the fraction of positions where both
logits have the same argmax. The evaluated model's PPL comes from the same forward pass; the
reference's PPL on the same windows comes for free. Both models are resident at once.

The reference cache that makes repeated KL comparisons cheap is in reference.py.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.data.windows import eval_window, window_count
from llmquant.errors import NumericalError
from llmquant.evaluate.reference import Reference, WindowStatistics, _HeadTap

KL_CHUNK = 128  # positions per chunk of the KL computation (bounds its float32 temporaries)


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


def kl_divergence(
    ref_logits: torch.Tensor, logits: torch.Tensor, chunk: int = KL_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(P_ref || P) in nats (float64 tensor [positions]) and argmax agreement (bool
    [positions]) for logits of shape [positions, vocab]; the math is float32 log-softmax."""
    kl, agree, _ = _kl_and_reference_log_probs(ref_logits, logits, chunk)
    return kl, agree


def _kl_and_reference_log_probs(
    ref_logits: torch.Tensor, logits: torch.Tensor, chunk: int = KL_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kl_divergence's two results, plus the reference's log-probabilities (for its NLL)."""
    if ref_logits.shape != logits.shape or ref_logits.dim() != 2:
        raise ValueError(f"logits of shapes {tuple(ref_logits.shape)} and {tuple(logits.shape)}: expected one [positions, vocab]")
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    agree = (ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)).cpu()
    return kl_from_log_probs(ref_logp, logp, chunk), agree, ref_logp


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
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """PPL of `model` on the windows of `ids`; with a `reference`, also the KL divergence and top-1
    agreement of `model` against it, from the same forward passes (`result.divergence`). With
    `save_as_reference` (a Reference of `model` itself with a cache directory), the same pass also
    writes `model`'s reference cache, for later runs that compare other models with it. With
    `bos_token_id`, every window is that id + seqlen - 1 tokens of `ids` (the module docstring)."""
    n = window_count(ids.numel(), seqlen, max_windows, bos_token_id is not None)
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
            window = eval_window(ids, k, seqlen, bos_token_id).unsqueeze(0).to(device)
            targets = window[0, 1:]
            raw = model(window, use_cache=False).logits
            logits = raw.float()
            # cross_entropy is exactly what the reference code computes; every path uses it for the PPL.
            nlls.append(F.cross_entropy(logits[0, :-1], targets, reduction="mean").item())
            if not math.isfinite(nlls[-1]):
                raise NumericalError(
                    f"window {k + 1} of {n}: the loss is {nlls[-1]} (the logits hold NaN/Inf: a NaN/Inf weight, "
                    f"or an overflow in {raw.dtype})"
                )
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
            reference_ppl=perplexity_of(sum(ref_nlls) / n, "the reference's"),
            window_kl=[w.mean().item() for w in position_kl],
            reference_cache=reference.status,
            computed_from="statistics" if windows_from_statistics == n else "logits" if windows_from_statistics == 0 else "mixed",
        )
    ppl = perplexity_of(sum(nlls) / n)  # = exp(sum(nll_k * seqlen) / (n * seqlen))
    return PerplexityResult(ppl, n, seqlen, n * seqlen, time.perf_counter() - start, nlls, divergence)


def perplexity_of(mean_nll: float, whose: str = "the") -> float:
    """exp(mean NLL); NumericalError where that is no number (NaN) or beyond a float (NLL > 709.78)."""
    if not math.isfinite(mean_nll) or mean_nll > math.log(sys.float_info.max):
        raise NumericalError(
            f"{whose} mean NLL is {mean_nll:.6g} nats per token: its perplexity e^{mean_nll:.6g} is not a finite number "
            "(a broken model, or logits that overflow)"
        )
    return math.exp(mean_nll)


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
    kl, agree, ref_logp = _kl_and_reference_log_probs(ref_logits[0, :-1], logits)
    return kl, agree, F.nll_loss(ref_logp, targets, reduction="mean").item()


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
