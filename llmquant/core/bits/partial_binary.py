"""Bit figures of the `partial_binary` layout (PB-LLM).

With r = salient entries / all entries (the share kept at `high_bit`):

    paper   = (1 - r) * 1 + r * high_bit            the figure comparison tables print for PB-LLM
                                                    (BiLLM/SliM-LLM: 10% at 8 bits = 1.70); no index
    code    = paper + 1                             PB-LLM's own Eq. 3: the salient positions stored as
                                                    a 1-bit-per-weight bitmap
    storage = (signs + high codes + index + side) / (rows * cols), where
              signs  = 1 bit per binarized entry
              codes  = high_bit bits per salient entry
              index  = the smaller of the bitmap (1 bit per weight) and CSR (per salient entry a column
                       index of ceil(log2(cols)) bits, per row a 32-bit offset)
              side   = per row an fp16 high-bit scale and a high_bit-wide zero point, per row and group
                       an fp16 alpha and an fp16 mu
"""

from __future__ import annotations

from dataclasses import dataclass

from llmquant.core.bits import FP16_BITS
from llmquant.core.record import BitFigures

CSR_OFFSET_BITS = 32


@dataclass(frozen=True)
class PartialBinaryBits:
    figures: BitFigures
    index_format: str  # "bitmap" or "csr": whichever stores the salient positions in fewer bits
    index_bits: int  # bits of that index for the whole layer

    def as_stats(self) -> dict[str, float | str | int]:
        return {
            "bits_convention": self.figures.paper,
            "bits_eq3": self.figures.code,
            "bits_storage": self.figures.storage,
            "index_format": self.index_format,
            "index_bits": self.index_bits,
        }


def csr_index_bits(rows: int, cols: int, salient: int) -> int:
    """Column index per salient entry plus one 32-bit offset per row."""
    column_index_bits = max(1, (cols - 1).bit_length())  # ceil(log2(cols)), at least one bit
    return salient * column_index_bits + rows * CSR_OFFSET_BITS


def partial_binary_bits(rows: int, cols: int, salient: int, high_bit: int, group_size: int) -> PartialBinaryBits:
    """Figures for one linear with `salient` entries at `high_bit` and the rest binarized."""
    numel = rows * cols
    groups = -(-cols // group_size)
    share = salient / numel
    paper = (1 - share) * 1 + share * high_bit
    bitmap, csr = numel, csr_index_bits(rows, cols, salient)
    index_format, index_bits = ("csr", csr) if csr < bitmap else ("bitmap", bitmap)
    weights = (numel - salient) * 1 + salient * high_bit
    side = rows * (FP16_BITS + high_bit) + rows * groups * 2 * FP16_BITS
    storage = (weights + index_bits + side) / numel
    return PartialBinaryBits(BitFigures(paper=paper, code=paper + 1, storage=storage), index_format, index_bits)
