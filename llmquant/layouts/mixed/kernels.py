"""Where the kernels find the tensors of the `mixed` layout (SliM-LLM, sign): one width per column group.

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

from llmquant.layouts.base import expand_groups
from llmquant.layouts.kernel_weights import KernelWeights, Tiles

# Columns of the per-group table.
WIDTH, CODE_BASE, CODE_COLUMNS, FIRST_COLUMN, ZERO_BASE, GROUPS_OF_WIDTH, RANK = range(7)
TABLE_COLUMNS = 7

# Tile shapes for the fused kernel: the per-group table lookups cost registers: 16-row decode tiles
# (159 registers at sm_90; 32 rows spilled 664 bytes per thread).
TILES = Tiles(decode=(16, 128, 4), prefill=(64, 64, 32, 4))


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
    return KernelWeights("mixed", weights, 0, module.out_features, module.in_features, extra=[table], tiles=TILES)
