"""SliM-LLM's group quantizers inside the GPTQ loop (docs/methods-spec.md §4.4) and the `mixed` record.

Every group is fitted once, when the loop reaches its first column, from the group's current
(error-compensated) values:
- b >= 2 bits: an asymmetric min-max grid whose scale is recalibrated per row by SQC, a search over
  tau * scale that minimises a salience-weighted |error|^norm;
- b = 1 bit: mu = row mean, alpha = mean |w| (not centred), w_hat = mu + alpha * sign(w - mu).

Deviations from the reference code, on purpose:
- Always asymmetric. The reference starts each layer with a symmetric zero point and only switches
  to asymmetric at the first N or N+1 group, so (N-1)-bit groups met before that get a shifted,
  clipped grid (docs/methods-spec.md §4.5). We do not reproduce that.
- sign(0) := +1 for the binarizer (the reference's torch.sign gives 0, i.e. w_hat = mu), because
  the packed 1-bit code has no zero.
- A group without salience outliers has no salient entries; the reference crashes there (4.10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmquant.core.gptq import ColumnQuantizer, CurrentColumns
from llmquant.core.record import QuantizedRecord
from llmquant.core.uniform import dequantize_codes, minmax_params, quantize_codes
from llmquant.layouts import make_record

# Salient = at or above the smallest entry whose salience z-score exceeds this (reference value).
SALIENCE_Z_THRESHOLD = 2.0
# Upper bound on rows x taus x cols elements evaluated at once by the SQC search.
SQC_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SQCSettings:
    points: int  # number of tau values (odd: tau = 1 plus (points - 1) / 2 on each side)
    low: float  # smallest tau
    high: float  # largest tau
    norm: float  # exponent of the error
    lambda_salience: float  # weight of salient elements' error (1 = no salience weighting)


def tau_grid(settings: SQCSettings, device: torch.device | str = "cpu") -> torch.Tensor:
    """tau values in the reference's order: 1, then ascending to `high`, then descending to `low`.

    The order decides ties: the first minimum wins, as with the reference's strict `<`."""
    side = (settings.points - 1) // 2
    steps = torch.arange(1, side + 1, dtype=torch.float32, device=device) / max(side, 1)
    one = torch.ones(1, device=device)
    return torch.cat([one, 1 + (settings.high - 1) * steps, 1 - (1 - settings.low) * steps])


def salient_mask(salience: torch.Tensor) -> torch.Tensor:
    """The reference's rule: z-scores over all entries of the group; the smallest entry with
    |z| > 2 is the threshold and every entry at or above it is salient. (A low-side outlier drags
    the threshold down so that most entries become salient; harmless only at lambda = 1.)"""
    z = (salience - salience.mean()) / salience.std()
    outliers = salience[z.abs() > SALIENCE_Z_THRESHOLD]  # empty for a constant group too (z is NaN)
    if outliers.numel() == 0:
        return torch.zeros_like(salience, dtype=torch.bool)
    return salience >= outliers.min()


def sqc_fit(
    values: torch.Tensor, u_diag: torch.Tensor, bits: int, settings: SQCSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of one group (rows x width) after the SQC search.

    Scaling xmin and xmax by tau scales the step and leaves the zero point unchanged, so only the
    scale is searched. Candidate scales are rounded to fp16 before they are scored, so the chosen
    one is optimal among the values the format can store."""
    base_scale, zero = minmax_params(values, bits, sym=False)
    scales = (base_scale.unsqueeze(1) * tau_grid(settings, values.device).unsqueeze(0)).half().float()
    mask = salient_mask(values.square() / u_diag.square().unsqueeze(0))
    weights = torch.where(mask, settings.lambda_salience, 1.0)
    errors = _grid_errors(values, weights, scales, zero, bits, settings.norm)
    best = errors.argmin(dim=1)  # first minimum on ties (documented torch behaviour)
    return scales.gather(1, best.unsqueeze(1)).squeeze(1), zero


def _grid_errors(
    values: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor, bits: int, norm: float
) -> torch.Tensor:
    """rows x taus: sum over the row of weight * |fake_quantize(w) - w|^norm, chunked over taus.

    The arithmetic is core.uniform.fake_quantize's, written as one in-place chain: this search is the
    bulk of the method's CPU time and the temporaries of the out-of-place form double it."""
    rows, width = values.shape
    chunk = max(1, SQC_CHUNK_ELEMENTS // max(rows * width, 1))
    zero3, values3, weights3 = zero[:, None, None], values.unsqueeze(1), weights.unsqueeze(1)
    maxq = 2**bits - 1
    parts = []
    for scale_chunk in scales.split(chunk, dim=1):
        scale3 = scale_chunk.unsqueeze(2)
        error = torch.div(values3, scale3).round_().add_(zero3).clamp_(0, maxq).sub_(zero3).mul_(scale3)
        parts.append(error.sub_(values3).abs_().pow_(norm).mul_(weights3).sum(dim=2))
    return torch.cat(parts, dim=1)


def binary_params(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (alpha, mu) = (mean |w|, mean w) of a group; alpha is not centred (reference)."""
    return values.abs().mean(dim=1), values.mean(dim=1)


def binary_codes(values: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """1 where w >= mu, else 0: sign(w - mu) with sign(0) := +1."""
    return (values >= mu).to(torch.float32)


def binary_dequantize(codes: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    # Same expression as layouts.decode, so the loop's values and the decoded ones agree exactly.
    return mu + alpha * (2 * codes - 1)


class MixedGroupQuantizer(ColumnQuantizer):
    """Column quantizer for gptq_loop with blocksize == group_size, so each block is one group."""

    def __init__(self, weight: torch.Tensor, group_bits: list[int], group_size: int,
                 u_diag: torch.Tensor, settings: SQCSettings):
        rows, self.cols = weight.shape
        self.group_bits, self.group_size = group_bits, group_size
        self.u_diag, self.settings = u_diag, settings
        self.codes = torch.zeros(rows, self.cols, dtype=torch.uint8, device=weight.device)
        # b >= 2: (step, integer zero point); b = 1: (alpha, mu). fp16-rounded when fitted.
        self.scales = torch.zeros(rows, len(group_bits), device=weight.device)
        self.zeros = torch.zeros(rows, len(group_bits), device=weight.device)

    def begin_block(self, start: int, end: int, current: CurrentColumns) -> None:
        group, values = start // self.group_size, current(start, end)
        bits = self.group_bits[group]
        if bits == 1:
            scale, zero = binary_params(values)
        else:
            scale, zero = sqc_fit(values, self.u_diag[start:end], bits, self.settings)
        # zero is an integer <= 255 for b >= 2 and so exact in fp16; rounding it is a no-op there.
        self.scales[:, group] = scale.half().float()
        self.zeros[:, group] = zero.half().float()

    def quantize_column(self, index: int, column: torch.Tensor, current: CurrentColumns) -> torch.Tensor:
        group = index // self.group_size
        bits, scale, zero = self.group_bits[group], self.scales[:, group], self.zeros[:, group]
        if bits == 1:
            codes = binary_codes(column, zero)
            dequantized = binary_dequantize(codes, scale, zero)
        else:
            codes = quantize_codes(column, scale, zero, bits)
            dequantized = dequantize_codes(codes, scale, zero)
        self.codes[:, index] = codes.to(torch.uint8)
        return dequantized

    def record(self, dequantized: torch.Tensor, loss: float, target_bits: int, stats: dict[str, Any]) -> QuantizedRecord:
        tensors = {
            "codes": self.codes,
            "group_bits": torch.tensor(self.group_bits, dtype=torch.uint8, device=self.codes.device),
            "scales": self.scales.half(),
            "zeros": self.zeros.half(),
        }
        meta = {"group_size": self.group_size, "target_bits": target_bits}
        return make_record("mixed", tensors, meta, loss, stats, expected=dequantized)
