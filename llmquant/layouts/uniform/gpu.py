"""The `uniform` layout's device function for the fused Triton kernel (llmquant/layouts/kernel_base.py):
the float32 tile W[n, k] from the stored tensors, as kernels.py describes them."""

from __future__ import annotations

import triton
import triton.language as tl

from llmquant.layouts.kernel_base import read_bits


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


dequant = dequant_uniform
