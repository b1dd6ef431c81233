"""Triton kernel support of the `uniform` layout: W[n, k] = scale[n, g] * (code[n, k] - zero[n, g]).

Reads the stored tensors as they are (no repack): the codes stream (row-major, `bits` per code),
the zero points (row-major over [rows, groups], `bits` each; absent when symmetric: 2^(bits-1)),
the fp16 scales, and g_idx (act-order) when present; g = k // group_size otherwise. Any width 1..8,
any group size (a partial last group, a group wider than the row), any shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmquant.core.groups import ceil_div
from llmquant.layouts.kernel_base import KernelWeights, read_bits


@triton.jit
def dequant_uniform(weights, rk, rn, K, N, SPEC: tl.constexpr):
    words, codes_bit, scales, zeros_bit, g_idx, group_size, groups = weights
    BITS: tl.constexpr = SPEC % 16
    SYM: tl.constexpr = (SPEC // 16) % 2
    HAS_G_IDX: tl.constexpr = SPEC // 32
    valid = (rn[:, None] < N) & (rk[None, :] < K)
    n = rn[:, None].to(tl.int64)
    q = read_bits(words, codes_bit + (n * K + rk[None, :]) * BITS, BITS, valid)
    if HAS_G_IDX:
        g = tl.load(g_idx + rk, mask=rk < K, other=0)
    else:
        g = rk // group_size
    slot = n * groups + g[None, :]
    s = tl.load(scales + slot, mask=valid, other=0.0).to(tl.float32)
    if SYM:
        z = q * 0 + (1 << (BITS - 1))
    else:
        z = read_bits(words, zeros_bit + slot * BITS, BITS, valid)
    # The decode's own arithmetic (layout.py), in float32: the tile equals the decoded weight.
    return tl.where(valid, s * (q.to(tl.float32) - z.to(tl.float32)), 0.0)


def prepare(module) -> KernelWeights:
    """`module`: a QuantizedLinear of this layout (its blob, streams and stored tensors)."""
    meta = module.meta
    bits, group_size, sym = meta["bits"], meta["group_size"], meta["sym"]
    scales = module.stored("scales")
    has_g_idx = "g_idx" in module.stored_names()
    weights = (
        module.blob.view(torch.int32),
        module.streams["codes"][0] * 8,
        scales,
        0 if sym else module.streams["zeros"][0] * 8,
        module.stored("g_idx") if has_g_idx else scales,  # never read without g_idx
        group_size,
        ceil_div(module.in_features, group_size),
    )
    spec = bits + 16 * int(sym) + 32 * int(has_g_idx)
    return KernelWeights(dequant_uniform, weights, spec, module.out_features, module.in_features)
