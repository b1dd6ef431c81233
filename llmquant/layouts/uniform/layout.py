"""The `uniform` layout (RTN, GPTQ): one integer grid per (row, column group).

    codes   uint8  [rows, cols]    in [0, 2^bits)
    scales  f16    [rows, groups]
    zeros   uint8  [rows, groups]  integer zero point (sym: 2^(bits-1))
    g_idx   int32  [cols]          optional: group of each column (act-order); default col // group_size
    meta    bits, group_size, sym
    W = scales * (codes - zeros)

Stored: codes and (asymmetric) zeros at `bits` bits, fp16 scales, the optional int32 g_idx.
"""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.record import BitFigures
from llmquant.layouts import bitpack
from llmquant.layouts.base import FP16, FP16_BITS, SIZE_LIMIT, Layout, Reader, ceil_div, expand_groups


def uniform_bits(rows: int, cols: int, bits: int, group_size: int, sym: bool, has_g_idx: bool = False) -> BitFigures:
    """RTN/GPTQ: codes at `bits`, per (row, group) an fp16 scale and (asymmetric) a `bits`-wide zero."""
    groups = ceil_div(cols, group_size)
    side = rows * groups * (FP16_BITS + (0 if sym else bits))
    if has_g_idx:
        side += cols * 32  # int32 group index per input column (act-order without static groups)
    storage = bits + side / (rows * cols)
    return BitFigures(paper=float(bits), code=float(bits), storage=storage)


class UniformLayout(Layout):
    name = "uniform"
    schema = {"codes": (torch.uint8, "rc"), "scales": (torch.float16, "rg"), "zeros": (torch.uint8, "rg")}
    optional = {"g_idx": (torch.int32, "c")}
    meta_spec = {"bits": (1, 8), "group_size": (1, SIZE_LIMIT), "sym": bool}
    group_key = "group_size"
    full_size_tensor = "codes"

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        codes = tensors["codes"].to(torch.float32)
        cols = codes.shape[1]
        if "g_idx" in tensors:
            idx = tensors["g_idx"].long()
            scales, zeros = tensors["scales"].float()[:, idx], tensors["zeros"].float()[:, idx]
        else:
            gs = meta["group_size"]
            scales = expand_groups(tensors["scales"].float(), cols, gs)
            zeros = expand_groups(tensors["zeros"].float(), cols, gs)
        return scales * (codes - zeros)

    def bit_figures(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BitFigures:
        rows, cols = self.shape_of(tensors)
        return uniform_bits(rows, cols, meta["bits"], meta["group_size"], meta["sym"], has_g_idx="g_idx" in tensors)

    def pack(self, t, meta, rows, cols):
        bits = meta["bits"]
        stored = {"codes": bitpack.pack(t["codes"], bits), "scales": t["scales"]}
        if meta["sym"]:
            # The symmetric zero point is implied by the width, so it is not stored; a record that
            # claims sym with other zero points would decode differently after a round trip.
            if not bool((t["zeros"] == 1 << (bits - 1)).all()):
                raise ValueError("a symmetric uniform record must have zeros == 2^(bits-1)")
        else:
            stored["zeros"] = bitpack.pack(t["zeros"], bits)
        if "g_idx" in t:
            stored["g_idx"] = t["g_idx"]
        return stored, {}

    def check_stored(self, r: Reader, meta, encoding, rows, cols):
        bits = meta["bits"]
        groups = ceil_div(cols, meta["group_size"])
        r.packed("codes", bits, rows * cols)
        r.raw("scales", FP16, (rows, groups))
        if not meta["sym"]:
            r.packed("zeros", bits, rows * groups)
        if r.has("g_idx"):
            _check_g_idx(r.raw("g_idx", torch.int32, (cols,)), groups)

    def unpack(self, r: Reader, meta, encoding, rows, cols):
        bits = meta["bits"]
        groups = ceil_div(cols, meta["group_size"])
        t = {"codes": r.bits("codes", bits, (rows, cols)), "scales": r.raw("scales", FP16, (rows, groups))}
        if meta["sym"]:
            t["zeros"] = torch.full((rows, groups), 1 << (bits - 1), dtype=torch.uint8, device=r.device)
        else:
            t["zeros"] = r.bits("zeros", bits, (rows, groups))
        if r.has("g_idx"):
            t["g_idx"] = _check_g_idx(r.raw("g_idx", torch.int32, (cols,)), groups)
        return t


def _check_g_idx(g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"g_idx holds group numbers outside [0, {groups})")
    return g_idx
