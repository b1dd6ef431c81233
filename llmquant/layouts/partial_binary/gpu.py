"""The `partial_binary` layout's device function for the fused Triton kernel (llmquant/layouts/kernel_base.py):
the float32 tile W[n, k] from the stored tensors, as kernels.py describes them."""

from __future__ import annotations

import triton
import triton.language as tl

from llmquant.layouts.kernel_base import read_bits


@triton.jit
def dequant_partial_binary(weights, rk, rn, K, N, SPEC: tl.constexpr):
    words, mask_bit, signs_bit, codes_bit, zeros_bit, high_scales, alpha, mu, row_start, chunk_counts, chunks, group_size, groups = weights
    HIGH_BIT: tl.constexpr = SPEC
    valid = (rn[:, None] < N) & (rk[None, :] < K)
    n = rn[:, None].to(tl.int64)
    position = n * K + rk[None, :]
    salient = read_bits(words, mask_bit + position, 1, valid)
    before = tl.cumsum(salient, axis=1) - salient  # salient entries before k in this chunk
    chunk = (rk // 128)[None, :]  # CHUNK; the K tile is one chunk
    start = tl.load(row_start + n, mask=rn[:, None] < N, other=0) + tl.load(
        chunk_counts + n * chunks + chunk, mask=valid, other=0
    ).to(tl.int64)
    rank = start + before.to(tl.int64)  # salient entries before (n, k), row-major
    is_salient = salient == 1
    code = read_bits(words, codes_bit + rank * HIGH_BIT, HIGH_BIT, valid & is_salient).to(tl.float32)
    sign = read_bits(words, signs_bit + position - rank, 1, valid & ~is_salient).to(tl.float32)
    high_zero = read_bits(words, zeros_bit + n * HIGH_BIT, HIGH_BIT, rn[:, None] < N).to(tl.float32)
    high_scale = tl.load(high_scales + n, mask=rn[:, None] < N, other=0.0).to(tl.float32)
    slot = n * groups + (rk // group_size)[None, :]
    a = tl.load(alpha + slot, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(mu + slot, mask=valid, other=0.0).to(tl.float32)
    # The decode's own arithmetic (layout.py).
    w = tl.where(is_salient, high_scale * (code - high_zero), m + a * (sign * 2 - 1))
    return tl.where(valid, w, 0.0)


dequant = dequant_partial_binary
