"""Contiguous column groups: the group-size rule every method shares, and sums over groups that
are the same on every device.

`index_add_` would sum groups in one call, but on CUDA it accumulates floats with atomics, in an order
that changes from run to run (so the same recipe gave different checkpoints, and a resumed run
differed from an uninterrupted one, on an H100). Here the columns of each group are added one at a
time, in column order, starting from zero: exactly the additions index_add_ makes on a CPU, so CPU
results are unchanged, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def group_sums(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sums of [..., cols] over column groups [g * group_size, (g + 1) * group_size): [..., groups]
    (the last group may be narrower)."""
    cols = values.shape[-1]
    groups = ceil_div(cols, group_size)
    padded = F.pad(values, (0, groups * group_size - cols)).reshape(*values.shape[:-1], groups, group_size)
    total = torch.zeros(padded.shape[:-1], dtype=values.dtype, device=values.device)
    for j in range(group_size):
        total += padded[..., j]
    return total


def check_group_size(group_size: int) -> None:
    """A recipe's column group size: -1 (the whole row is one group) or a positive number of columns."""
    if group_size == 0 or group_size < -1:
        raise ValueError("group_size must be -1 (one group per row) or a positive number of columns")


def effective_group_size(group_size: int, cols: int) -> int:
    """The group size a linear of `cols` columns actually uses: -1, or any size >= cols, is one group."""
    return cols if group_size == -1 or group_size >= cols else group_size
