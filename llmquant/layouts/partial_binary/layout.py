"""The `partial_binary` layout (PB-LLM): a salient share on a per-row high-bit grid, the rest binarized.

    salient_mask   bool  [rows, cols]    True = kept at high_bit
    signs          bool  [rows, cols]    True = +1 (used where not salient)
    salient_codes  uint8 [rows, cols]    in [0, 2^high_bit) (used where salient; 0 elsewhere)
    high_scales    f16   [rows]
    high_zeros     uint8 [rows]
    alpha          f16   [rows, groups]
    mu             f16   [rows, groups]
    meta           high_bit, group_size
    W = high_scales * (salient_codes - high_zeros)   where salient
    W = mu + alpha * (2 * signs - 1)                 elsewhere

Stored: the salient positions as a bitmap or CSR (whichever is smaller), salient codes at high_bit
bits only there, signs at 1 bit only elsewhere; fp16 per-row high scales, high zeros at high_bit.

Bit figures, with r = salient entries / all entries (the share kept at `high_bit`):

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
from typing import Any

import torch

from llmquant.core.record import BitFigures
from llmquant.layouts import bitpack
from llmquant.layouts.base import (
    FP16,
    FP16_BITS,
    SIZE_LIMIT,
    Layout,
    Reader,
    ceil_div,
    csr_index_width,
    expand_groups,
    signs_of,
)

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
    return salient * csr_index_width(cols) + rows * CSR_OFFSET_BITS


def partial_binary_bits(rows: int, cols: int, salient: int, high_bit: int, group_size: int) -> PartialBinaryBits:
    """Figures for one linear with `salient` entries at `high_bit` and the rest binarized."""
    numel = rows * cols
    groups = ceil_div(cols, group_size)
    share = salient / numel
    paper = (1 - share) * 1 + share * high_bit
    bitmap, csr = numel, csr_index_bits(rows, cols, salient)
    index_format, index_bits = ("csr", csr) if csr < bitmap else ("bitmap", bitmap)
    weights = (numel - salient) * 1 + salient * high_bit
    side = rows * (FP16_BITS + high_bit) + rows * groups * 2 * FP16_BITS
    storage = (weights + index_bits + side) / numel
    return PartialBinaryBits(BitFigures(paper=paper, code=paper + 1, storage=storage), index_format, index_bits)


class PartialBinaryLayout(Layout):
    name = "partial_binary"
    schema = {
        "salient_mask": (torch.bool, "rc"),
        "signs": (torch.bool, "rc"),
        "salient_codes": (torch.uint8, "rc"),
        "high_scales": (torch.float16, "r"),
        "high_zeros": (torch.uint8, "r"),
        "alpha": (torch.float16, "rg"),
        "mu": (torch.float16, "rg"),
    }
    meta_spec = {"high_bit": (1, 8), "group_size": (1, SIZE_LIMIT)}
    group_key = "group_size"
    full_size_tensor = "salient_mask"

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        mask = tensors["salient_mask"]
        cols = mask.shape[1]
        gs = meta["group_size"]
        high = tensors["high_scales"].float().unsqueeze(1) * (
            tensors["salient_codes"].to(torch.float32) - tensors["high_zeros"].float().unsqueeze(1)
        )
        alpha = expand_groups(tensors["alpha"].float(), cols, gs)
        mu = expand_groups(tensors["mu"].float(), cols, gs)
        return torch.where(mask, high, mu + alpha * signs_of(tensors["signs"]))

    def _bits(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> PartialBinaryBits:
        rows, cols = self.shape_of(tensors)
        salient = int(tensors["salient_mask"].sum())
        return partial_binary_bits(rows, cols, salient, meta["high_bit"], meta["group_size"])

    def bit_figures(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BitFigures:
        return self._bits(tensors, meta).figures

    def bit_stats(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
        salient = int(tensors["salient_mask"].sum())
        return {
            "salient_count": salient,
            "salient_share": salient / tensors["salient_mask"].numel(),
            **self._bits(tensors, meta).as_stats(),
        }

    def pack(self, t, meta, rows, cols):
        high_bit = meta["high_bit"]
        mask = t["salient_mask"]
        stored: dict[str, torch.Tensor] = {}
        # The same rule as the storage bit figure, so the file and the report agree on the index.
        if csr_index_bits(rows, cols, int(mask.sum())) < rows * cols:
            index_format = "csr"
            # nonzero() lists positions row by row, i.e. in the order mask indexing uses for codes.
            stored["salient_cols"] = bitpack.pack(mask.nonzero()[:, 1], csr_index_width(cols))
            stored["salient_row_ends"] = mask.sum(dim=1).cumsum(0).to(torch.int32)
        else:
            index_format = "bitmap"
            stored["salient_mask"] = bitpack.pack_mask(mask)
        stored["signs"] = bitpack.pack(t["signs"][~mask], 1)
        stored["salient_codes"] = bitpack.pack(t["salient_codes"][mask], high_bit)
        stored["high_scales"] = t["high_scales"]
        stored["high_zeros"] = bitpack.pack(t["high_zeros"], high_bit)
        stored["alpha"], stored["mu"] = t["alpha"], t["mu"]
        return stored, {"index_format": index_format}

    def check_stored(self, r: Reader, meta, encoding, rows, cols):
        high_bit = meta["high_bit"]
        groups = ceil_div(cols, meta["group_size"])
        index_format = encoding.get("index_format")
        if index_format == "bitmap":
            salient = r.ones("salient_mask", rows * cols)
        elif index_format == "csr":
            salient = csr_rows_and_columns(r, rows, cols)[0].numel()  # the column indices are checked, not the codes
        else:
            raise ValueError(f"encoding['index_format'] must be 'bitmap' or 'csr', got {index_format!r}")
        r.packed("signs", 1, rows * cols - salient)
        r.packed("salient_codes", high_bit, salient)
        r.raw("high_scales", FP16, (rows,))
        r.packed("high_zeros", high_bit, rows)
        r.raw("alpha", FP16, (rows, groups))
        r.raw("mu", FP16, (rows, groups))

    def unpack(self, r: Reader, meta, encoding, rows, cols):
        high_bit = meta["high_bit"]
        groups = ceil_div(cols, meta["group_size"])
        index_format = encoding.get("index_format")
        if index_format == "bitmap":
            mask = r.mask("salient_mask", (rows, cols))
        elif index_format == "csr":
            mask = mask_from_csr(r, rows, cols)
        else:
            raise ValueError(f"encoding['index_format'] must be 'bitmap' or 'csr', got {index_format!r}")
        return {
            "salient_mask": mask,
            "signs": r.bits_at("signs", 1, ~mask).bool(),
            "salient_codes": r.bits_at("salient_codes", high_bit, mask),
            "high_scales": r.raw("high_scales", FP16, (rows,)),
            "high_zeros": r.bits("high_zeros", high_bit, (rows,)),
            "alpha": r.raw("alpha", FP16, (rows, groups)),
            "mu": r.raw("mu", FP16, (rows, groups)),
        }


def mask_from_csr(r: Reader, rows: int, cols: int) -> torch.Tensor:
    row_of, columns = csr_rows_and_columns(r, rows, cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=r.device)
    mask[row_of, columns] = True
    return mask


def csr_rows_and_columns(r: Reader, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and the column of every salient entry of a CSR index, checked: row ends
    non-decreasing, columns strictly increasing within a row and below `cols`."""
    ends = r.raw("salient_row_ends", torch.int32, (rows,)).long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    if bool((counts < 0).any()):
        raise ValueError("salient_row_ends must be non-decreasing")
    # int64: at 256 columns the indices come back as uint8, and `uint8 >= 256` compares with 0.
    columns = r.bits("salient_cols", csr_index_width(cols), (int(ends[-1]),)).long()
    row_of = torch.repeat_interleave(torch.arange(rows, device=r.device), counts)
    # Strictly increasing columns within a row: no duplicates, and the entries come in the
    # row-major order in which the salient codes were written.
    same_row = row_of[1:] == row_of[:-1]
    if bool((columns >= cols).any()) or bool((same_row & (columns[1:] <= columns[:-1])).any()):
        raise ValueError("salient_cols must be increasing column numbers < cols within each row")
    return row_of, columns
