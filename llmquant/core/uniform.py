"""Uniform (integer-grid) quantization: min-max parameters, codes, dequantization.

Follows the GPTQ reference quantizer exactly: the range always includes 0, an all-zero row gets the
range [-1, 1], the symmetric zero point is (maxq + 1) / 2.
"""

from __future__ import annotations

import torch


def minmax_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for x (rows x cols). zero is integer-valued (float dtype)."""
    maxq = 2**bits - 1
    zeros_ = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    xmin = torch.minimum(x.min(dim=1).values, zeros_)
    xmax = torch.maximum(x.max(dim=1).values, zeros_)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1]; scale/zero broadcast against x (use [:, None] for rows)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize_codes(quantize_codes(x, scale, zero, bits), scale, zero)
