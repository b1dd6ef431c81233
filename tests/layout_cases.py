"""Random records of each layout, and the storage each must take by the rules of docs/format.md
(shared by the format tests and the kernel tests)."""

from __future__ import annotations

import torch

from llmquant.layouts.binary_residual import binary_residual_bits
from llmquant.layouts.mixed import mixed_bits
from llmquant.layouts.partial_binary import partial_binary_bits
from llmquant.layouts.uniform import uniform_bits


def ceil_div(a, b):
    return -(-a // b)


def nbytes(count, width):
    return ceil_div(count * width, 8)


def uniform_record(rows, cols, g, *, bits, group_size, sym=False, act_order=False):
    groups = ceil_div(cols, group_size)
    tensors = {
        "codes": torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8),
        "scales": (torch.rand(rows, groups, generator=g) * 0.1 + 0.01).half(),
        "zeros": (
            torch.full((rows, groups), 1 << (bits - 1), dtype=torch.uint8)
            if sym
            else torch.randint(0, 1 << bits, (rows, groups), generator=g, dtype=torch.uint8)
        ),
    }
    if act_order:
        tensors["g_idx"] = (torch.randperm(cols, generator=g) // group_size).to(torch.int32)
    meta = {"bits": bits, "group_size": group_size, "sym": sym}
    expected = nbytes(rows * cols, bits) + rows * groups * 2 + (0 if sym else nbytes(rows * groups, bits))
    expected += 4 * cols if act_order else 0
    figure = uniform_bits(rows, cols, bits, group_size, sym, has_g_idx=act_order)
    return "uniform", tensors, meta, expected, figure


def mixed_record(rows, cols, g, *, widths, group_size):
    groups = ceil_div(cols, group_size)
    choice = torch.tensor(widths, dtype=torch.uint8)
    group_bits = choice[torch.randint(0, len(widths), (groups,), generator=g)]
    column_bits = group_bits.repeat_interleave(group_size)[:cols].float()
    codes = (torch.rand(rows, cols, generator=g) * 2**column_bits).floor().to(torch.uint8)
    integer_zeros = (torch.rand(rows, groups, generator=g) * 2 ** group_bits.float()).floor()
    zeros = torch.where(group_bits == 1, torch.randn(rows, groups, generator=g) * 0.01, integer_zeros).half()
    tensors = {
        "codes": codes,
        "group_bits": group_bits,
        "scales": (torch.rand(rows, groups, generator=g) * 0.1).half(),
        "zeros": zeros,
    }
    meta = {"group_size": group_size, "target_bits": 2}
    widths_of_cols = [min(group_size, cols - s) for s in range(0, cols, group_size)]
    expected = groups + rows * groups * 2  # group_bits (uint8 each), fp16 scales
    for b in set(group_bits.tolist()):
        n_cols = sum(w for w, gb in zip(widths_of_cols, group_bits.tolist()) if gb == b)
        n_groups = int((group_bits == b).sum())
        expected += nbytes(rows * n_cols, b) + (rows * n_groups * 2 if b == 1 else nbytes(rows * n_groups, b))
    figure = mixed_bits(rows, cols, group_bits.tolist(), group_size)
    return "mixed", tensors, meta, expected, figure


def partial_binary_record(rows, cols, g, *, high_bit, group_size, salient_share):
    groups = ceil_div(cols, group_size)
    mask = torch.rand(rows, cols, generator=g) < salient_share
    tensors = {
        "salient_mask": mask,
        "signs": (torch.rand(rows, cols, generator=g) < 0.5) & ~mask,
        "salient_codes": torch.randint(0, 1 << high_bit, (rows, cols), generator=g, dtype=torch.uint8) * mask,
        "high_scales": (torch.rand(rows, generator=g) * 0.1).half(),
        "high_zeros": torch.randint(0, 1 << high_bit, (rows,), generator=g, dtype=torch.uint8),
        "alpha": (torch.rand(rows, groups, generator=g) * 0.1).half(),
        "mu": (torch.randn(rows, groups, generator=g) * 0.01).half(),
    }
    meta = {"high_bit": high_bit, "group_size": group_size}
    salient = int(mask.sum())
    column_bits = max(1, (cols - 1).bit_length())
    csr_is_smaller = salient * column_bits + 32 * rows < rows * cols
    index = nbytes(salient, column_bits) + 4 * rows if csr_is_smaller else nbytes(rows * cols, 1)
    expected = nbytes(rows * cols - salient, 1) + nbytes(salient, high_bit) + index
    expected += rows * 2 + nbytes(rows, high_bit) + 2 * rows * groups * 2
    figure = partial_binary_bits(rows, cols, salient, high_bit, group_size).figures
    return "partial_binary", tensors, meta, expected, figure


def binary_residual_record(rows, cols, g, *, blocksize, salient_share):
    blocks = ceil_div(cols, blocksize)
    columns = torch.rand(cols, generator=g) < salient_share
    salient = columns.unsqueeze(0).expand(rows, cols)
    tensors = {
        "salient_columns": columns,
        "sparse_mask": (torch.rand(rows, cols, generator=g) < 0.2) & ~salient,
        "signs": torch.rand(rows, cols, generator=g) < 0.5,
        "signs2": (torch.rand(rows, cols, generator=g) < 0.5) & salient,
        "params": (torch.randn(rows, blocks, 8, generator=g) * 0.05).half(),
    }
    meta = {"blocksize": blocksize}
    n_salient = int(columns.sum())
    expected = nbytes(cols, 1) + nbytes(rows * cols, 1) + nbytes(rows * n_salient, 1)
    expected += nbytes(rows * (cols - n_salient), 1) + rows * blocks * 8 * 2
    figure = binary_residual_bits(rows, cols, blocksize, n_salient).figures
    return "binary_residual", tensors, meta, expected, figure


CASES = {
    **{f"uniform-{b}bit": (uniform_record, {"bits": b, "group_size": 64}) for b in (2, 3, 4, 8)},
    "uniform-3bit-sym": (uniform_record, {"bits": 3, "group_size": 32, "sym": True}),
    "uniform-4bit-g_idx": (uniform_record, {"bits": 4, "group_size": 16, "act_order": True}),
    "mixed-1to4": (mixed_record, {"widths": [1, 2, 3, 4], "group_size": 32}),
    "mixed-1bit-only": (mixed_record, {"widths": [1], "group_size": 16}),
    "mixed-3bit-only": (mixed_record, {"widths": [3], "group_size": 128}),
    "mixed-2and8": (mixed_record, {"widths": [2, 8], "group_size": 8}),
    **{
        f"partial_binary-{hb}bit-{share}": (
            partial_binary_record,
            {"high_bit": hb, "group_size": 64, "salient_share": share},
        )
        for hb in range(2, 9)
        for share in (0.02, 0.3)  # sparse -> CSR, dense -> bitmap (on layers wider than a few columns)
    },
    "binary_residual": (binary_residual_record, {"blocksize": 32, "salient_share": 0.1}),
    "binary_residual-none-salient": (binary_residual_record, {"blocksize": 128, "salient_share": 0.0}),
    "binary_residual-all-salient": (binary_residual_record, {"blocksize": 16, "salient_share": 1.0}),
}


def build(case, rows, cols, seed=0):
    """Group sizes are not clamped to the width: 1x7 layers have one group wider than the layer."""
    builder, kwargs = CASES[case]
    return builder(rows, cols, torch.Generator().manual_seed(seed), **kwargs)


# Every setting the fused kernels are checked on (tests/test_kernels.py in Triton's interpreter,
# benchmarks/kernel_check.py compiled on a GPU).
KERNEL_CASES = [
    "uniform-2bit", "uniform-3bit", "uniform-4bit", "uniform-8bit", "uniform-3bit-sym", "uniform-4bit-g_idx",
    "mixed-1to4", "mixed-1bit-only", "mixed-3bit-only", "mixed-2and8",
    "partial_binary-8bit-0.02", "partial_binary-8bit-0.3", "partial_binary-3bit-0.02", "partial_binary-5bit-0.3",
    "binary_residual", "binary_residual-none-salient", "binary_residual-all-salient",
]  # fmt: skip


def packed_module(case, rows, cols, seed=0):
    """(a QuantizedLinear of the case's packed record, the record's decoded weight)."""
    from llmquant.formats import packers
    from llmquant.layouts import decode
    from llmquant.runtime import QuantizedLinear

    layout, tensors, meta, _, _ = build(case, rows, cols, seed)
    return QuantizedLinear(packers.pack(layout, tensors, meta), bias=None), decode(layout, tensors, meta)
