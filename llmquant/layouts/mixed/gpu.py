"""The `mixed` layout's device function for the fused Triton kernel (llmquant/layouts/kernel_base.py):
the float32 tile W[n, k] from the stored tensors, as kernels.py describes them."""

from __future__ import annotations

import triton
import triton.language as tl

from llmquant.layouts.kernel_base import read_bits


@triton.jit
def dequant_mixed(weights, rk, rn, K, N, SPEC: tl.constexpr):
    words, table, scales, means, group_size, groups = weights
    valid = (rn[:, None] < N) & (rk[None, :] < K)
    g = rk // group_size
    row = table + g * 7  # TABLE_COLUMNS
    inside = rk < K
    width = tl.load(row + 0, mask=inside, other=1).to(tl.int32)[None, :]
    code_base = tl.load(row + 1, mask=inside, other=0)[None, :]
    code_columns = tl.load(row + 2, mask=inside, other=0)[None, :]
    column = (tl.load(row + 3, mask=inside, other=0) + rk - g * group_size)[None, :]
    zero_base = tl.load(row + 4, mask=inside, other=0)[None, :]
    groups_of_width = tl.load(row + 5, mask=inside, other=0)[None, :]
    rank = tl.load(row + 6, mask=inside, other=0)[None, :]
    n = rn[:, None].to(tl.int64)
    q = read_bits(words, code_base + (n * code_columns + column) * width, width, valid)
    s = tl.load(scales + n * groups + g[None, :], mask=valid, other=0.0).to(tl.float32)
    slot = n * groups_of_width + rank
    one_bit = width == 1
    z = read_bits(words, zero_base + slot * width, width, valid & ~one_bit).to(tl.float32)
    mu = tl.load(means + slot, mask=valid & one_bit, other=0.0).to(tl.float32)
    qf = q.to(tl.float32)
    # The decode's own arithmetic for each kind of group (layout.py).
    w = tl.where(one_bit, mu + s * (2 * qf - 1), s * (qf - z))
    return tl.where(valid, w, 0.0)


dequant = dequant_mixed
