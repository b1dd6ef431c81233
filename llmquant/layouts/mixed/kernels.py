"""Triton kernel support of the `mixed` layout (SliM-LLM, sign): one width per column group.

    W[n, k] = scale[n, g] * (code - zero[n, g])        b_g >= 2
    W[n, k] = mu[n, g] + scale[n, g] * (2 code - 1)    b_g = 1

The stored tensors are read as they are: the codes of each width b are a [rows, n_b] matrix of the
columns of b-bit groups (`codes_b<b>`), their zero points a [rows, groups_b] matrix (`zeros_b<b>`),
the means of 1-bit groups fp16 (`zeros_b1`). One table of 7 integers per group, made once (a few
hundred bytes per linear), says where group g's codes and zero points are: the kernel reads the
width per element, so one K tile may span groups of different widths (any group size works).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmquant.layouts.base import expand_groups
from llmquant.layouts.kernel_base import KernelWeights, read_bits

# Columns of the per-group table.
WIDTH, CODE_BASE, CODE_COLUMNS, FIRST_COLUMN, ZERO_BASE, GROUPS_OF_WIDTH, RANK = range(7)
TABLE_COLUMNS = 7


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


def group_table(module) -> torch.Tensor:
    """[groups, 7] int64: per group its width, where its codes start (bit offset in the blob), how
    many columns its width's code matrix has, its first column there, where its width's zero
    points start (bit offset; unused for 1-bit groups), how many groups have its width, its rank
    among them."""
    group_size = module.meta["group_size"]
    group_bits = module.stored("group_bits").cpu().long()
    cols = module.in_features
    column_bits = expand_groups(group_bits, cols, group_size)
    table = torch.zeros(len(group_bits), TABLE_COLUMNS, dtype=torch.int64)
    for b in sorted(set(group_bits.tolist())):
        of_width = (group_bits == b).nonzero().flatten()
        widths = [min(group_size, cols - int(g) * group_size) for g in of_width]
        table[of_width, WIDTH] = b
        table[of_width, CODE_BASE] = module.streams[f"codes_b{b}"][0] * 8
        table[of_width, CODE_COLUMNS] = int((column_bits == b).sum())
        table[of_width, FIRST_COLUMN] = torch.tensor([0, *widths[:-1]]).cumsum(0)
        table[of_width, ZERO_BASE] = module.streams[f"zeros_b{b}"][0] * 8 if b > 1 else 0
        table[of_width, GROUPS_OF_WIDTH] = len(of_width)
        table[of_width, RANK] = torch.arange(len(of_width))
    return table.to(module.blob.device)


def prepare(module) -> KernelWeights:
    scales = module.stored("scales")
    table = group_table(module)
    means = module.stored("zeros_b1") if "zeros_b1" in module.stored_names() else scales  # read at 1-bit groups only
    group_size = module.meta["group_size"]
    groups = -(-module.in_features // group_size)
    weights = (module.blob.view(torch.int32), table, scales, means, group_size, groups)
    return KernelWeights(dequant_mixed, weights, 0, module.out_features, module.in_features, extra=[table])
