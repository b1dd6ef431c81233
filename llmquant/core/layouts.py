"""The record layouts: which tensors a quantized linear consists of, and how they decode.

This is the in-memory contract between methods (which fill records) and the packed format (which
bit-packs these tensors into safetensors, docs/format.md). `decode` is the single definition of what
a layout means: a method's `record.dequantized` must equal `decode(record.layout, record.tensors,
record.meta)` exactly, and the packed loader calls the same function, so a packed model reproduces
the fake-quant model bit for bit.

Shapes: rows = out_features, cols = in_features, groups = ceil(cols / group_size),
blocks = ceil(cols / blocksize). Group/block g covers columns [g*size, min((g+1)*size, cols)).
Float side parameters are float16 (the storage precision; methods round them when they fit them, so
their error feedback sees exactly what is stored). Booleans are torch.bool.

uniform (RTN, GPTQ)
    codes   uint8  [rows, cols]    in [0, 2^bits)
    scales  f16    [rows, groups]
    zeros   uint8  [rows, groups]  integer zero point (sym: 2^(bits-1))
    g_idx   int32  [cols]          optional: group of each column (act-order); default col // group_size
    meta    bits, group_size, sym
    W = scales * (codes - zeros)

mixed (SliM-LLM: per-group bit widths)
    codes       uint8 [rows, cols]    in [0, 2^group_bits[g])
    group_bits  uint8 [groups]        1..8
    scales      f16   [rows, groups]  b >= 2: step; b = 1: alpha
    zeros       f16   [rows, groups]  b >= 2: integer zero point; b = 1: mean mu
    meta        group_size, target_bits
    W = scales * (codes - zeros)              for b >= 2
    W = zeros + scales * (2 * codes - 1)      for b = 1

partial_binary (PB-LLM)
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

binary_residual (BiLLM)
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
"""

from __future__ import annotations

from typing import Any

import torch

LAYOUTS = ("uniform", "mixed", "partial_binary", "binary_residual")


def _expand_groups(per_group: torch.Tensor, cols: int, size: int) -> torch.Tensor:
    """[rows, groups] -> [rows, cols] by repeating each group's value over its columns."""
    return per_group.repeat_interleave(size, dim=1)[:, :cols]


def _sign(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.float32) * 2 - 1


def decode(layout: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """The float32 weight a record stands for. Pure torch, any device."""
    t = {k: v for k, v in tensors.items()}
    if layout == "uniform":
        codes = t["codes"].to(torch.float32)
        rows, cols = codes.shape
        if "g_idx" in t:
            idx = t["g_idx"].long()
            scales, zeros = t["scales"].float()[:, idx], t["zeros"].float()[:, idx]
        else:
            gs = meta["group_size"]
            scales = _expand_groups(t["scales"].float(), cols, gs)
            zeros = _expand_groups(t["zeros"].float(), cols, gs)
        return scales * (codes - zeros)
    if layout == "mixed":
        codes = t["codes"].to(torch.float32)
        rows, cols = codes.shape
        gs = meta["group_size"]
        scales = _expand_groups(t["scales"].float(), cols, gs)
        zeros = _expand_groups(t["zeros"].float(), cols, gs)
        one_bit = _expand_groups((t["group_bits"] == 1).unsqueeze(0), cols, gs).expand(rows, cols)
        multi = scales * (codes - zeros)
        binary = zeros + scales * (2 * codes - 1)
        return torch.where(one_bit, binary, multi)
    if layout == "partial_binary":
        mask = t["salient_mask"]
        rows, cols = mask.shape
        gs = meta["group_size"]
        high = t["high_scales"].float().unsqueeze(1) * (
            t["salient_codes"].to(torch.float32) - t["high_zeros"].float().unsqueeze(1)
        )
        alpha = _expand_groups(t["alpha"].float(), cols, gs)
        mu = _expand_groups(t["mu"].float(), cols, gs)
        return torch.where(mask, high, mu + alpha * _sign(t["signs"]))
    if layout == "binary_residual":
        signs = t["signs"]
        rows, cols = signs.shape
        bs = meta["blocksize"]
        p = t["params"].float()
        a1, m1, a2, m2, ca, cm, sa, sm = (_expand_groups(p[:, :, k], cols, bs) for k in range(8))
        s1, s2 = _sign(signs), _sign(t["signs2"])
        salient = t["salient_columns"].unsqueeze(0).expand(rows, cols)
        sal = a1 * s1 + m1 + a2 * s2 + m2
        rest = torch.where(t["sparse_mask"], sa * s1 + sm, ca * s1 + cm)
        return torch.where(salient, sal, rest)
    raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")


_SCHEMAS: dict[str, dict[str, tuple[torch.dtype, str]]] = {
    "uniform": {"codes": (torch.uint8, "rc"), "scales": (torch.float16, "rg"), "zeros": (torch.uint8, "rg")},
    "mixed": {
        "codes": (torch.uint8, "rc"),
        "group_bits": (torch.uint8, "g"),
        "scales": (torch.float16, "rg"),
        "zeros": (torch.float16, "rg"),
    },
    "partial_binary": {
        "salient_mask": (torch.bool, "rc"),
        "signs": (torch.bool, "rc"),
        "salient_codes": (torch.uint8, "rc"),
        "high_scales": (torch.float16, "r"),
        "high_zeros": (torch.uint8, "r"),
        "alpha": (torch.float16, "rg"),
        "mu": (torch.float16, "rg"),
    },
    "binary_residual": {
        "salient_columns": (torch.bool, "c"),
        "sparse_mask": (torch.bool, "rc"),
        "signs": (torch.bool, "rc"),
        "signs2": (torch.bool, "rc"),
        "params": (torch.float16, "rb8"),
    },
}
_OPTIONAL = {"uniform": {"g_idx": (torch.int32, "c")}}


def check_tensors(layout: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], rows: int, cols: int) -> None:
    """Raises ValueError if the tensors do not match the layout's schema (names, dtypes, shapes)."""
    if layout not in _SCHEMAS:
        raise ValueError(f"unknown layout {layout!r}")
    size = meta.get("group_size", meta.get("blocksize", cols))
    n = -(-cols // size)
    dims = {"r": rows, "c": cols, "g": n, "b": n, "8": 8}
    schema = dict(_SCHEMAS[layout])
    for key, spec in _OPTIONAL.get(layout, {}).items():
        if key in tensors:
            schema[key] = spec
    if set(tensors) != set(schema):
        raise ValueError(f"{layout}: tensors {sorted(tensors)} do not match {sorted(schema)}")
    for key, (dtype, shape) in schema.items():
        want = tuple(dims[d] for d in shape)
        got = tensors[key]
        if got.dtype != dtype or tuple(got.shape) != want:
            raise ValueError(f"{layout}.{key}: expected {dtype} {want}, got {got.dtype} {tuple(got.shape)}")
