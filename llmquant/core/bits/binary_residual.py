"""Bit figures of the `binary_residual` layout (BiLLM).

With r = salient weights / all weights (salient columns / cols, since salient columns span all rows):

    paper   = 2 r + 1 (1 - r) = 1 + r          BiLLM's N_param (Eq. 14): salient weights carry two
                                               sign planes, the rest one; flags and FP params ignored
    code    = paper + (1 - r) + 1 / rows       + the 1-bit concentrated/sparse flag of every
            = 2 + 1 / rows                       non-salient weight, + the salient-column bitmap
                                                 (1 bit per column, i.e. 1/rows per weight); note the
                                                 total does not depend on r
    storage = code + 8 * 16 * blocks / cols    + the 8 fp16 parameters per row and block
                                                 (alpha, mu of two salient orders, concentrated, sparse)

storage is the bit count of the layout's tensors as the packer stores them (sign plane 1 bit per
weight, second sign plane only at salient columns, split flag only at non-salient columns, column
bitmap 1 bit per column, params 16 bits each), before any padding to whole bytes.
The paper's own N_storing = 1 + 1/blocksize flag bits (its accounting of the split flag and the
salient-column identifier) is reported alongside as a statistic.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmquant.core.bits import FP16_BITS
from llmquant.core.record import BitFigures

PARAMS_PER_ROW_BLOCK = 8


@dataclass(frozen=True)
class BinaryResidualBits:
    figures: BitFigures
    salient_ratio: float  # r: share of weights in salient columns
    flag_bits: float  # per weight: split flags + column bitmap (code - paper)
    param_bits: float  # per weight: fp16 side parameters (storage - code)
    paper_storing_bits: float  # the paper's N_storing = 1 + 1/blocksize

    def as_stats(self) -> dict[str, float]:
        return {
            "salient_ratio": self.salient_ratio,
            "flag_bits": self.flag_bits,
            "param_bits": self.param_bits,
            "paper_storing_bits": self.paper_storing_bits,
        }


def binary_residual_bits(rows: int, cols: int, blocksize: int, salient_columns: int) -> BinaryResidualBits:
    """Figures for one linear whose salient columns number `salient_columns` in total."""
    numel = rows * cols
    blocks = -(-cols // blocksize)
    salient = rows * salient_columns
    signs = numel + salient  # first plane everywhere, second plane at salient columns
    flags = (numel - salient) + cols  # split flag per non-salient weight + column bitmap
    params = rows * blocks * PARAMS_PER_ROW_BLOCK * FP16_BITS
    figures = BitFigures(paper=signs / numel, code=(signs + flags) / numel, storage=(signs + flags + params) / numel)
    return BinaryResidualBits(
        figures=figures,
        salient_ratio=salient / numel,
        flag_bits=flags / numel,
        param_bits=params / numel,
        paper_storing_bits=1 + 1 / min(blocksize, cols),
    )
