"""PB-LLM (Shang et al., ICLR 2024), PTQ path "PB-GPTQ": partial binarization with GPTQ error feedback.

A fixed share of each weight matrix (the salient entries) is kept on a per-row `high_bit` min-max grid;
every other entry is binarized to mu + alpha * sign(w - mu) with per-(row, group) alpha and mu. The
mask and all quantizer parameters are fixed once from the original weight, then the full GPTQ loop
quantizes column by column with that fixed mask (docs/methods-spec.md §3.2). See docs/methods/pbllm.md.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from llmquant.core.gptq import ColumnQuantizer, CurrentColumns, gptq_loop
from llmquant.core.groups import check_group_size, effective_group_size, group_sums
from llmquant.core.hessian import prepare_factor
from llmquant.core.record import QuantizedRecord
from llmquant.core.uniform import dequantize_codes, minmax_params, quantize_codes
from llmquant.layouts import make_record
from llmquant.methods.base import HessianMethodConfig, Method, register


class PBLLMConfig(HessianMethodConfig):
    name: Literal["pbllm"] = "pbllm"
    salient_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="share of each group's weights kept at high_bit (the reference's low_frac = 1 - this); "
        "0.1 is the 'PB-LLM 10%' setting comparison tables print",
    )
    high_bit: int = Field(8, ge=2, le=8, description="bits of the salient weights' per-row min-max grid")
    salient_metric: Literal["hessian", "magnitude"] = Field(
        "hessian", description="w^2 / U_jj^2 (README runs) or |w| (the reference's CLI default)"
    )
    group_size: int = Field(
        -1, description="columns per mask/binarizer group (pooled over all rows); -1 = the whole matrix"
    )
    stats_mode: Literal["reference", "corrected"] = Field(
        "reference",
        description="binarizer mu/alpha over the row with salient entries zeroed (reference; lower output "
        "error and PPL on SmolLM2, docs/methods/pbllm.md) or over the binarized entries only (corrected)",
    )

    @model_validator(mode="after")
    def _check(self) -> "PBLLMConfig":
        check_group_size(self.group_size)
        return self


def fit_high_quantizer(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric min-max (scale, zero) over the whole row, fitted once (reference HighQuantizer).

    The scale is rounded to fp16 now, so the error feedback sees exactly what is stored."""
    scale, zero = minmax_params(weight, bits, sym=False)
    return scale.half().float(), zero


def salience_scores(weight: torch.Tensor, upper: torch.Tensor, metric: str) -> torch.Tensor:
    """|w| or the OBS cost w^2 / U_jj^2 of quantizing each entry first (docs/methods-spec.md §1.5)."""
    if metric == "magnitude":
        return weight.abs()
    diag = torch.diag(upper).to(weight.dtype)
    return weight**2 / diag.unsqueeze(0) ** 2


def select_salient(scores: torch.Tensor, group_size: int, salient_fraction: float) -> torch.Tensor:
    """Boolean mask of the entries kept at high bit, chosen per group of columns over all rows pooled.

    In a group of `count` entries exactly floor((1 - salient_fraction) * count) entries with the lowest
    scores are binarized (the reference's rank floor(low_frac * count)) and the rest are salient. The
    reference binarizes `score <= threshold`, i.e. one entry more plus every tie; here the stable sort
    makes the count exact and breaks ties deterministically: among equal scores the entry earlier in
    row-major order is binarized.
    """
    salient = torch.ones_like(scores, dtype=torch.bool)
    low_frac = 1.0 - salient_fraction
    for start in range(0, scores.shape[1], group_size):
        group = scores[:, start : start + group_size]
        binary_count = math.floor(low_frac * group.numel())
        lowest = torch.argsort(group.flatten(), stable=True)[:binary_count]
        flat = torch.ones(group.numel(), dtype=torch.bool, device=scores.device)
        flat[lowest] = False
        salient[:, start : start + group_size] = flat.view(group.shape)
    return salient


def fit_binary_params(
    weight: torch.Tensor, salient: torch.Tensor, group_size: int, stats_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) (alpha, mu) of the binarizer, fp16-rounded, each [rows, groups].

    reference: the weight with salient entries set to 0, all of the group's entries averaged (the
    zeros stay in the pool, so alpha is diluted towards 0 and mu towards 0 by about the salient share).
    corrected: mu = mean and alpha = mean |w - mu| over the binarized entries only (the paper's l1 mean).
    A (row, group) with no binarized entry gets alpha = mu = 0.
    """
    group_of = torch.arange(weight.shape[1], device=weight.device) // group_size

    def per_group_sum(values: torch.Tensor) -> torch.Tensor:
        return group_sums(values, group_size)  # deterministic on CUDA too (core/groups.py)

    binarized = (~salient).to(weight.dtype)
    kept = weight * binarized
    members = torch.ones_like(weight) if stats_mode == "reference" else binarized
    count = per_group_sum(members).clamp(min=1)
    has_binary = per_group_sum(binarized) > 0
    zero = torch.zeros_like(count)
    # fp16 rounding before alpha is fitted, so alpha is the mean distance to the mu that is stored.
    mu = torch.where(has_binary, per_group_sum(kept) / count, zero).half().float()
    spread = (kept - mu[:, group_of]).abs() * members
    alpha = torch.where(has_binary, per_group_sum(spread) / count, zero).half().float()
    return alpha, mu


class PartialBinaryQuantizer(ColumnQuantizer):
    """Quantizes a column with the fixed mask and parameters; records signs and high-bit codes."""

    def __init__(
        self,
        salient: torch.Tensor,
        high_scale: torch.Tensor,
        high_zero: torch.Tensor,
        high_bit: int,
        alpha: torch.Tensor,
        mu: torch.Tensor,
        group_size: int,
    ):
        self.salient, self.high_bit, self.group_size = salient, high_bit, group_size
        self.high_scale, self.high_zero = high_scale, high_zero
        self.alpha, self.mu = alpha, mu
        self.signs = torch.zeros_like(salient)
        self.codes = torch.zeros(salient.shape, dtype=torch.uint8, device=salient.device)

    def quantize_column(self, index: int, column: torch.Tensor, current: CurrentColumns) -> torch.Tensor:
        group = index // self.group_size
        mu, alpha = self.mu[:, group], self.alpha[:, group]
        salient = self.salient[:, index]
        # sign(0) := +1: the packed sign plane has no zero (the reference's torch.sign gives mu there).
        positive = column >= mu
        binary = mu + alpha * (positive.to(column.dtype) * 2 - 1)
        codes = quantize_codes(column, self.high_scale, self.high_zero, self.high_bit)
        high = dequantize_codes(codes, self.high_scale, self.high_zero)
        self.signs[:, index] = positive & ~salient
        self.codes[:, index] = torch.where(salient, codes, torch.zeros_like(codes)).to(torch.uint8)
        return torch.where(salient, high, binary)

    def record(self, dequantized: torch.Tensor, loss: float, stats: dict) -> QuantizedRecord:
        tensors = {
            "salient_mask": self.salient,
            "signs": self.signs,
            "salient_codes": self.codes,
            "high_scales": self.high_scale.half(),
            "high_zeros": self.high_zero.to(torch.uint8),
            "alpha": self.alpha.half(),
            "mu": self.mu.half(),
        }
        meta = {"high_bit": self.high_bit, "group_size": self.group_size}
        # Same fp16-rounded parameters and the same arithmetic as decode: the loop's values are exact.
        return make_record("partial_binary", tensors, meta, loss, stats, expected=dequantized)


@register
class PBLLM(Method[PBLLMConfig]):
    Config = PBLLMConfig
    layouts = ("partial_binary",)

    def quantize(self, name, weight, hessian, observer=None) -> QuantizedRecord:
        cfg = self.config
        W, H = weight.float(), hessian
        upper, _ = prepare_factor(W, H, cfg.percdamp, name)
        group_size = effective_group_size(cfg.group_size, W.shape[1])
        high_scale, high_zero = fit_high_quantizer(W, cfg.high_bit)
        salient = select_salient(salience_scores(W, upper, cfg.salient_metric), group_size, cfg.salient_fraction)
        alpha, mu = fit_binary_params(W, salient, group_size, cfg.stats_mode)
        quantizer = PartialBinaryQuantizer(salient, high_scale, high_zero, cfg.high_bit, alpha, mu, group_size)
        result = gptq_loop(W, upper, quantizer, cfg.blocksize, propagate_within_block=True)
        stats = {"salient_metric": cfg.salient_metric, "stats_mode": cfg.stats_mode}
        return quantizer.record(result.dequantized, result.loss, stats)
