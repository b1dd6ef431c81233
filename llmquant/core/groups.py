"""Sums over contiguous column groups, the same on every device.

`index_add_` would do it in one call, but on CUDA it accumulates floats with atomics, in an order
that changes from run to run (so the same recipe gave different checkpoints, and a resumed run
differed from an uninterrupted one, on an H100). Here the columns of each group are added one at a
time, in column order, starting from zero: exactly the additions index_add_ makes on a CPU, so CPU
results are unchanged, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_sums(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sums of [..., cols] over column groups [g * group_size, (g + 1) * group_size): [..., groups]
    (the last group may be narrower)."""
    cols = values.shape[-1]
    groups = -(-cols // group_size)
    padded = F.pad(values, (0, groups * group_size - cols)).reshape(*values.shape[:-1], groups, group_size)
    total = torch.zeros(padded.shape[:-1], dtype=values.dtype, device=values.device)
    for j in range(group_size):
        total += padded[..., j]
    return total
