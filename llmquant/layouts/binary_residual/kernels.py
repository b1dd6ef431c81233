"""Triton kernel support of the `binary_residual` layout (BiLLM): a 2-bit code per weight decoded
through 8 parameters per (row, block).

    salient column:  W = a1 (2 s - 1) + m1 + a2 (2 s2 - 1) + m2
    otherwise:       W = sa (2 s - 1) + sm  if sparse  else  ca (2 s - 1) + cm

The stored tensors are read as they are: the first sign plane (every weight), the second plane
(salient columns only, row-major) and the sparse flag (other columns only, row-major), the column
bitmap and the fp16 parameters. Where a column's second-plane bit or flag is in its row follows
from how many salient columns come before it: one int32 per column, made once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmquant.layouts import bitpack
from llmquant.layouts.kernel_base import KernelWeights, read_bits


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


def prepare(module) -> KernelWeights:
    cols = module.in_features
    columns = bitpack.unpack_mask(module.stored("salient_columns"), (cols,)).long()
    salient_before = (columns.cumsum(0) - columns).to(module.blob.device, torch.int32)
    streams = module.streams
    blocksize = module.meta["blocksize"]
    weights = (
        module.blob.view(torch.int32),
        streams["salient_columns"][0] * 8,
        streams["signs"][0] * 8,
        streams["signs2"][0] * 8,
        streams["sparse_mask"][0] * 8,
        salient_before,
        int(columns.sum()),
        module.stored("params"),
        blocksize,
        -(-cols // blocksize),
    )
    return KernelWeights(
        dequant_binary_residual, weights, 0, module.out_features, cols, extra=[salient_before]
    )
