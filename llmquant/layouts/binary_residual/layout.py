"""The `binary_residual` layout (BiLLM): residual-binarized salient columns, the rest split in two.

    salient_columns  bool [cols]          salient columns (per block, chosen by the count search)
    sparse_mask      bool [rows, cols]    True = "sparse" (large) group, False = "concentrated"
                                          (used at non-salient columns; False elsewhere)
    signs            bool [rows, cols]    first-order sign plane, True = +1
    signs2           bool [rows, cols]    second-order plane (used at salient columns; False elsewhere)
    params           f16  [rows, blocks, 8]
                     (sal_alpha1, sal_mu1, sal_alpha2, sal_mu2, conc_alpha, conc_mu, sparse_alpha, sparse_mu)
    meta             blocksize
    W = a1*(2s-1) + m1 + a2*(2s2-1) + m2     at salient columns
    W = sa*(2s-1) + sm  if sparse else  ca*(2s-1) + cm     elsewhere

Stored: the sign plane everywhere, the second sign plane at salient columns only, the
sparse/concentrated flag at non-salient columns only, the salient columns as a 1-bit-per-column
map; fp16 block parameters.

Bit figures, with r = salient weights / all weights (salient columns / cols, since salient columns
span all rows):

    paper   = 2 r + 1 (1 - r) = 1 + r          BiLLM's N_param (Eq. 14): salient weights carry two
                                               sign planes, the rest one; flags and FP params ignored
    code    = paper + (1 - r) + 1 / rows       + the 1-bit concentrated/sparse flag of every
            = 2 + 1 / rows                       non-salient weight, + the salient-column bitmap
                                                 (1 bit per column, i.e. 1/rows per weight); note the
                                                 total does not depend on r
    storage = code + 8 * 16 * blocks / cols    + the 8 fp16 parameters per row and block
                                                 (alpha, mu of two salient orders, concentrated, sparse)

storage is the bit count of the stored tensors before any padding to whole bytes. The paper's own
N_storing = 1 + 1/blocksize flag bits (its accounting of the split flag and the salient-column
identifier) is reported alongside as a statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmquant.core.record import BitFigures
from llmquant.layouts import bitpack
from llmquant.layouts.base import FP16, FP16_BITS, SIZE_LIMIT, Layout, Reader, ceil_div, expand_groups, signs_of

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
    blocks = ceil_div(cols, blocksize)
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


class BinaryResidualLayout(Layout):
    name = "binary_residual"
    schema = {
        "salient_columns": (torch.bool, "c"),
        "sparse_mask": (torch.bool, "rc"),
        "signs": (torch.bool, "rc"),
        "signs2": (torch.bool, "rc"),
        "params": (torch.float16, "rb8"),
    }
    meta_spec = {"blocksize": (1, SIZE_LIMIT)}
    group_key = "blocksize"
    full_size_tensor = "signs"

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        signs = tensors["signs"]
        rows, cols = signs.shape
        bs = meta["blocksize"]
        p = tensors["params"].float()
        a1, m1, a2, m2, ca, cm, sa, sm = (expand_groups(p[:, :, k], cols, bs) for k in range(PARAMS_PER_ROW_BLOCK))
        s1, s2 = signs_of(signs), signs_of(tensors["signs2"])
        salient = tensors["salient_columns"].unsqueeze(0).expand(rows, cols)
        sal = a1 * s1 + m1 + a2 * s2 + m2
        rest = torch.where(tensors["sparse_mask"], sa * s1 + sm, ca * s1 + cm)
        return torch.where(salient, sal, rest)

    def _bits(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BinaryResidualBits:
        rows, cols = self.shape_of(tensors)
        return binary_residual_bits(rows, cols, meta["blocksize"], int(tensors["salient_columns"].sum()))

    def bit_figures(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BitFigures:
        return self._bits(tensors, meta).figures

    def bit_stats(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
        return self._bits(tensors, meta).as_stats()

    def pack(self, t, meta, rows, cols):
        salient = t["salient_columns"].unsqueeze(0).expand(rows, cols)
        stored = {
            "salient_columns": bitpack.pack_mask(t["salient_columns"]),
            "signs": bitpack.pack_mask(t["signs"]),
            "signs2": bitpack.pack(t["signs2"][salient], 1),
            "sparse_mask": bitpack.pack(t["sparse_mask"][~salient], 1),
            "params": t["params"],
        }
        return stored, {}

    def check_stored(self, r: Reader, meta, encoding, rows, cols):
        blocks = ceil_div(cols, meta["blocksize"])
        salient = r.ones("salient_columns", cols)
        r.packed("signs", 1, rows * cols)
        r.packed("signs2", 1, rows * salient)
        r.packed("sparse_mask", 1, rows * (cols - salient))
        r.raw("params", FP16, (rows, blocks, PARAMS_PER_ROW_BLOCK))

    def unpack(self, r: Reader, meta, encoding, rows, cols):
        blocks = ceil_div(cols, meta["blocksize"])
        columns = r.mask("salient_columns", (cols,))
        salient = columns.unsqueeze(0).expand(rows, cols)
        return {
            "salient_columns": columns,
            "signs": r.mask("signs", (rows, cols)),
            "signs2": r.bits_at("signs2", 1, salient).bool(),
            "sparse_mask": r.bits_at("sparse_mask", 1, ~salient).bool(),
            "params": r.raw("params", FP16, (rows, blocks, PARAMS_PER_ROW_BLOCK)),
        }
