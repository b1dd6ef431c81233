"""Bit figures of the `mixed` layout (SliM-LLM: one bit width per column group)."""

from __future__ import annotations

from collections.abc import Sequence

from llmquant.core.bits import FP16_BITS
from llmquant.core.record import BitFigures

# The layout stores one uint8 bit tag per group (layouts.py); per matrix, not per row.
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
