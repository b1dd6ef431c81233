"""The `mixed` layout (SliM-LLM; also the sign baseline): one bit width per column group.

    codes       uint8 [rows, cols]    in [0, 2^group_bits[g])
    group_bits  uint8 [groups]        1..8
    scales      f16   [rows, groups]  b >= 2: step; b = 1: alpha
    zeros       f16   [rows, groups]  b >= 2: integer zero point; b = 1: mean mu
    meta        group_size, target_bits
    W = scales * (codes - zeros)              for b >= 2
    W = zeros + scales * (2 * codes - 1)      for b = 1

Stored: one codes tensor per width that occurs (the columns of its groups, row by row), zeros of
b >= 2 groups at b bits per width, fp16 means of 1-bit groups in `zeros_b1`, fp16 scales, and the
uint8 width of each group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmquant.core.record import BitFigures
from llmquant.layouts import bitpack
from llmquant.layouts.base import FP16, FP16_BITS, SIZE_LIMIT, Layout, Reader, ceil_div, expand_groups

# The layout stores one uint8 bit tag per group; per matrix, not per row.
GROUP_TAG_BITS = 8


def group_widths(cols: int, group_size: int) -> list[int]:
    """Columns of each group; the last group is narrower when group_size does not divide cols."""
    return [min(group_size, cols - start) for start in range(0, cols, group_size)]


def mixed_bits(rows: int, cols: int, group_bits: Sequence[int], group_size: int) -> BitFigures:
    """code = sum_g cols_g * b_g / cols, the code-weight average (exactly the target N for every
    allocation SliM-LLM's search produces).

    paper = code: the paper's "N-bit" is this average with all side data ignored, so the two agree;
    an unbalanced user allocation reports its true average rather than a nominal N.

    storage adds, per (row, group), an fp16 scale and a zero point: an integer zero at the group's
    width for b >= 2, an fp16 mean for 1-bit groups; plus one tag per group for the whole matrix.
    """
    widths = group_widths(cols, group_size)
    if len(widths) != len(group_bits):
        raise ValueError(f"{len(group_bits)} group bit widths for {len(widths)} groups")
    code_bits = sum(w * b for w, b in zip(widths, group_bits))
    zero_bits = sum(FP16_BITS if b == 1 else b for b in group_bits)
    side_bits = rows * (len(widths) * FP16_BITS + zero_bits) + len(widths) * GROUP_TAG_BITS
    code = code_bits / cols
    return BitFigures(paper=code, code=code, storage=code + side_bits / (rows * cols))


def _integral(values: torch.Tensor, what: str) -> torch.Tensor:
    """Float tensor holding integers (fp16 zero points) -> int64, refusing anything else."""
    as_float = values.float()
    if not bool(torch.isfinite(as_float).all()) or not torch.equal(as_float, as_float.round()):
        raise ValueError(f"{what} must hold integers")
    return as_float.to(torch.int64)


def check_group_bits(group_bits: torch.Tensor) -> None:
    if bool(((group_bits < 1) | (group_bits > 8)).any()):
        raise ValueError("group_bits must lie in 1..8")


class MixedLayout(Layout):
    name = "mixed"
    schema = {
        "codes": (torch.uint8, "rc"),
        "group_bits": (torch.uint8, "g"),
        "scales": (torch.float16, "rg"),
        "zeros": (torch.float16, "rg"),
    }
    meta_spec = {"group_size": (1, SIZE_LIMIT)}
    group_key = "group_size"
    full_size_tensor = "codes"

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        codes = tensors["codes"].to(torch.float32)
        rows, cols = codes.shape
        gs = meta["group_size"]
        scales = expand_groups(tensors["scales"].float(), cols, gs)
        zeros = expand_groups(tensors["zeros"].float(), cols, gs)
        one_bit = expand_groups((tensors["group_bits"] == 1).unsqueeze(0), cols, gs).expand(rows, cols)
        multi = scales * (codes - zeros)
        binary = zeros + scales * (2 * codes - 1)
        return torch.where(one_bit, binary, multi)

    def bit_figures(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BitFigures:
        rows, cols = self.shape_of(tensors)
        return mixed_bits(rows, cols, [int(b) for b in tensors["group_bits"].tolist()], meta["group_size"])

    def pack(self, t, meta, rows, cols):
        gs = meta["group_size"]
        group_bits = t["group_bits"]
        check_group_bits(group_bits)
        column_bits = expand_groups(group_bits, cols, gs)
        stored = {"group_bits": group_bits, "scales": t["scales"]}
        for b in sorted(set(group_bits.tolist())):
            stored[f"codes_b{b}"] = bitpack.pack(t["codes"][:, column_bits == b], b)
            zeros = t["zeros"][:, group_bits == b]
            if b == 1:
                stored["zeros_b1"] = zeros.reshape(-1).contiguous()
            else:
                stored[f"zeros_b{b}"] = bitpack.pack(_integral(zeros, f"zeros of {b}-bit groups"), b)
        return stored, {}

    def check_stored(self, r: Reader, meta, encoding, rows, cols):
        gs = meta["group_size"]
        groups = ceil_div(cols, gs)
        group_bits = r.raw("group_bits", torch.uint8, (groups,))
        check_group_bits(group_bits)
        column_bits = expand_groups(group_bits, cols, gs)
        for b in sorted(set(group_bits.tolist())):
            r.packed(f"codes_b{b}", b, rows * int((column_bits == b).sum()))
            n = int((group_bits == b).sum())
            if b == 1:
                r.raw("zeros_b1", FP16, (rows * n,))
            else:
                r.packed(f"zeros_b{b}", b, rows * n)
        r.raw("scales", FP16, (rows, groups))

    def unpack(self, r: Reader, meta, encoding, rows, cols):
        gs = meta["group_size"]
        groups = ceil_div(cols, gs)
        group_bits = r.raw("group_bits", torch.uint8, (groups,))
        check_group_bits(group_bits)
        column_bits = expand_groups(group_bits, cols, gs)
        codes = torch.zeros(rows, cols, dtype=torch.uint8, device=r.device)
        zeros = torch.zeros(rows, groups, dtype=FP16, device=r.device)
        for b in sorted(set(group_bits.tolist())):
            in_width = column_bits == b
            codes[:, in_width] = r.bits(f"codes_b{b}", b, (rows, int(in_width.sum())))
            groups_b = group_bits == b
            n = int(groups_b.sum())
            if b == 1:
                zeros[:, groups_b] = r.raw("zeros_b1", FP16, (rows * n,)).reshape(rows, n)
            else:
                zeros[:, groups_b] = r.bits(f"zeros_b{b}", b, (rows, n)).to(FP16)
        scales = r.raw("scales", FP16, (rows, groups))
        return {"codes": codes, "group_bits": group_bits, "scales": scales, "zeros": zeros}
