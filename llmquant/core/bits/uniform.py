"""Bit figures of the `uniform` layout (RTN, GPTQ)."""

from __future__ import annotations

from llmquant.core.bits import FP16_BITS
from llmquant.core.record import BitFigures


def uniform_bits(rows: int, cols: int, bits: int, group_size: int, sym: bool, has_g_idx: bool = False) -> BitFigures:
    """RTN/GPTQ: codes at `bits`, per (row, group) an fp16 scale and (asymmetric) a `bits`-wide zero."""
    groups = -(-cols // group_size)
    side = rows * groups * (FP16_BITS + (0 if sym else bits))
    if has_g_idx:
        side += cols * 32  # int32 group index per input column (act-order without static groups)
    storage = bits + side / (rows * cols)
    return BitFigures(paper=float(bits), code=float(bits), storage=storage)
