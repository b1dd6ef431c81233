"""Perplexity under the papers' protocol (methods-spec 1.8) and KL divergence against a reference.

Windows: n = floor(tokens / seqlen) non-overlapping windows [k*seqlen, (k+1)*seqlen), tail dropped,
no extra BOS per window (optionally only the first `max_windows`). Per window, the mean cross-entropy
of its seqlen - 1 next-token predictions times seqlen is its NLL; PPL = exp(sum NLL / (n * seqlen)),
i.e. the exponential of the mean per-window mean loss, exactly as the reference code computes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PerplexityResult:
    ppl: float
    windows: int
    seqlen: int
    tokens_evaluated: int
    seconds: float
    window_nll: list[float]  # mean NLL of each window (for comparisons and bootstrap error bars)


def window_count(tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    n = tokens // seqlen
    return min(n, max_windows) if max_windows else n


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
    on_window: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    n = window_count(ids.numel(), seqlen, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    start = time.perf_counter()
    nlls = []
    for k in range(n):
        window = ids[k * seqlen : (k + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(window, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="mean")
        nlls.append(loss.item())
        if on_window:
            on_window(k + 1, n)
    ppl = math.exp(sum(nlls) / n)  # = exp(sum(nll_k * seqlen) / (n * seqlen))
    return PerplexityResult(ppl, n, seqlen, n * seqlen, time.perf_counter() - start, nlls)
