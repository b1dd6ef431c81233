"""The `binary_residual` layout's device function for the fused Triton kernel (llmquant/layouts/kernel_base.py):
the float32 tile W[n, k] from the stored tensors, as kernels.py describes them."""

from __future__ import annotations

import triton
import triton.language as tl

from llmquant.layouts.kernel_base import read_bits


@triton.jit
def dequant_binary_residual(weights, rk, rn, K, N, SPEC: tl.constexpr):
    words, columns_bit, signs_bit, signs2_bit, sparse_bit, salient_before, salient_total, params, blocksize, blocks = weights
    valid = (rn[:, None] < N) & (rk[None, :] < K)
    inside = rk < K
    n = rn[:, None].to(tl.int64)
    salient = (read_bits(words, columns_bit + rk, 1, inside) == 1)[None, :]
    before = tl.load(salient_before + rk, mask=inside, other=0).to(tl.int64)[None, :]
    s1 = read_bits(words, signs_bit + n * K + rk[None, :], 1, valid).to(tl.float32) * 2 - 1
    s2 = read_bits(words, signs2_bit + n * salient_total + before, 1, valid & salient).to(tl.float32) * 2 - 1
    others = K - salient_total
    sparse = read_bits(words, sparse_bit + n * others + (rk[None, :] - before), 1, valid & ~salient) == 1
    p = params + (n * blocks + (rk // blocksize)[None, :]) * 8
    a1 = tl.load(p + 0, mask=valid & salient, other=0.0).to(tl.float32)
    m1 = tl.load(p + 1, mask=valid & salient, other=0.0).to(tl.float32)
    a2 = tl.load(p + 2, mask=valid & salient, other=0.0).to(tl.float32)
    m2 = tl.load(p + 3, mask=valid & salient, other=0.0).to(tl.float32)
    rest = valid & ~salient
    alpha = tl.load(p + tl.where(sparse, 6, 4), mask=rest, other=0.0).to(tl.float32)
    mean = tl.load(p + tl.where(sparse, 7, 5), mask=rest, other=0.0).to(tl.float32)
    # The decode's own arithmetic (layout.py), term for term.
    w = tl.where(salient, a1 * s1 + m1 + a2 * s2 + m2, alpha * s1 + mean)
    return tl.where(valid, w, 0.0)


dequant = dequant_binary_residual
