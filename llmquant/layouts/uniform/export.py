"""The `uniform` layout in other formats: compressed-tensors `pack-quantized`, GPTQ (v2 zero points)
and GGUF Q8_0 / Q5_0 / Q4_0 (exact) or Q4_1 (approximate). One home for what each format can hold
of this layout and how its tensors are laid out there; writing the files is llmquant/export/.

Every mapping here moves the same integers and the same fp16 scales: W = s * (c - z) holds in the
target as it holds in llmquant (docs/format.md, "Which layout goes where").

    compressed-tensors  weight_packed  int32 [rows, ceil(cols*b/32)]  each row's codes c, dense, LSB first
                        weight_scale   f16   [rows, groups]
                        weight_zero_point int32 [ceil(rows*b/32), groups]  z packed along the rows (asym only)
                        weight_shape   int64 [2]
                        its reader subtracts 2^(b-1) from both c and z, so (c - z) is unchanged.
    gptq (v2)           qweight  int32 [cols*b/32, rows]  each output column's codes, dense along K, LSB first
                        qzeros   int32 [groups, rows*b/32]  z (v2: not z - 1) packed along the rows
                        scales   f16   [groups, rows]
                        g_idx    int32 [cols]  group of each input column (act-order as stored)
    gguf                per 32-column block: fp16 d = s, q = (c - z) + offset; Q8_0 offset 0 (int8),
                        Q5_0 16, Q4_0 8; Q4_1 (approximate) q = c, m = fp16(-s*z).

Each problem function returns None when the target holds the linear exactly, else the reason (one
line, for the user), so the caller can refuse before writing anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmquant.layouts import bitpack
from llmquant.layouts.base import ceil_div, expand_groups

GPTQ_BITS = (2, 3, 4, 8)  # what vLLM's gptq kernels read (gptq_gemm: 2/3/4/8; Marlin: sym 4/8)
CT_ASYM_BITS = (4, 8)  # asymmetric widths a compressed-tensors kernel reads in vLLM (Marlin uint4/uint8)
GGUF_BLOCK = 32
GGUF_EXACT = ("Q4_0", "Q5_0", "Q8_0")  # smallest first
GGUF_APPROXIMATE = ("Q4_1",)
# The range of c - z each exact type holds: q = (c - z) + offset must fit in its unsigned width.
_GGUF_RANGE = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q8_0": (-128, 127)}


def per_row(meta: dict[str, Any], cols: int) -> bool:
    """One group per row (group size >= in_features): the targets' 'channel' / group_size -1."""
    return meta["group_size"] >= cols


def _delta_range(meta: dict[str, Any]) -> tuple[int, int]:
    """The values c - z can take for this width and symmetry."""
    bits = meta["bits"]
    if meta["sym"]:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return -((1 << bits) - 1), (1 << bits) - 1


def _group_problem(meta: dict[str, Any], cols: int) -> str | None:
    group = meta["group_size"]
    if not per_row(meta, cols) and cols % group:
        return (
            f"group size {group} does not divide in_features {cols} (the last group has {cols % group} columns); "
            "re-quantize with a group size that divides it (e.g. 64 or 32)"
        )
    return None


# --------------------------------------------------------------------------------------------------
# Widening: asymmetric b-bit -> symmetric (b+1)-bit, exactly


def widen_problem(meta: dict[str, Any]) -> str | None:
    if not meta["sym"] and meta["bits"] >= 8:
        return f"asymmetric {meta['bits']}-bit cannot be widened to a symmetric {meta['bits'] + 1}-bit (at most 8 bits)"
    return None


def widen_sym(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An asymmetric b-bit record as the symmetric (b+1)-bit record of the same weight:
    c' = c - z + 2^b in [1, 2^(b+1) - 1], zero 2^b, same scales: s * (c' - 2^b) = s * (c - z).
    A symmetric record comes back unchanged."""
    if meta["sym"]:
        return tensors, meta
    bits = meta["bits"]
    cols = tensors["codes"].shape[1]
    if "g_idx" in tensors:
        zeros = tensors["zeros"][:, tensors["g_idx"].long()]
    else:
        zeros = expand_groups(tensors["zeros"], cols, meta["group_size"])
    codes = (tensors["codes"].to(torch.int16) - zeros.to(torch.int16) + (1 << bits)).to(torch.uint8)
    widened = dict(tensors, codes=codes, zeros=torch.full_like(tensors["zeros"], 1 << bits))
    return widened, {**meta, "bits": bits + 1, "sym": True}


# --------------------------------------------------------------------------------------------------
# Dense int32 packing (LSB first), as both compressed-tensors and GPTQ lay their words out


def pack_rows_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, k] integers in [0, 2^bits) -> int32 [n, ceil(k*bits/32)]: each row packed densely, value i
    at bit i*bits of the row's words (values straddle words), the last word zero-padded."""
    n, k = values.shape
    padded = ceil_div(k, 32) * 32  # 32 values fill exactly `bits` words
    stream = torch.nn.functional.pad(values.to(torch.uint8), (0, padded - k))
    words = bitpack.pack(stream, bits).view(torch.int32).reshape(n, padded * bits // 32)  # little-endian bytes
    return words[:, : ceil_div(k * bits, 32)].contiguous()


# --------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized


def ct_problem(meta: dict[str, Any], rows: int, cols: int, has_g_idx: bool) -> str | None:
    bits, sym = meta["bits"], meta["sym"]
    if bits < 2:
        return f"{bits}-bit: compressed-tensors kernels read 2 to 8 bits"
    if not sym and bits not in CT_ASYM_BITS:
        return (
            f"asymmetric {bits}-bit: vLLM's compressed-tensors kernels read asymmetric 4 and 8 bits only (Marlin); "
            f"--sym-widen stores it exactly as symmetric {bits + 1}-bit"
        )
    if has_g_idx:
        return "act-order g_idx: the compressed-tensors decompressor ignores weight_g_idx (use --format gptq)"
    return _group_problem(meta, cols)


def ct_scheme(meta: dict[str, Any], cols: int) -> dict[str, Any]:
    """The `weights` quantization args of the config group this linear belongs to."""
    channel = per_row(meta, cols)
    return {
        "num_bits": meta["bits"],
        "type": "int",
        "symmetric": bool(meta["sym"]),
        "strategy": "channel" if channel else "group",
        "group_size": None if channel else meta["group_size"],
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def to_compressed_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    bits = meta["bits"]
    rows, cols = tensors["codes"].shape
    out = {
        "weight_packed": pack_rows_int32(tensors["codes"], bits),
        "weight_scale": tensors["scales"].contiguous(),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not meta["sym"]:
        out["weight_zero_point"] = pack_rows_int32(tensors["zeros"].T, bits).T.contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# GPTQ, v2 zero points


def gptq_problem(meta: dict[str, Any], rows: int, cols: int, has_g_idx: bool) -> str | None:
    bits = meta["bits"]
    if bits not in GPTQ_BITS:
        return f"{bits}-bit: GPTQ kernels read {', '.join(map(str, GPTQ_BITS))} bits" + (
            f" (--sym-widen stores it exactly as symmetric {bits + 1}-bit)" if not meta["sym"] and bits + 1 in GPTQ_BITS else ""
        )
    if (cols * bits) % 32 or (rows * bits) % 32:
        return f"{rows}x{cols} at {bits} bits does not fill whole int32 words along both dims (qweight, qzeros)"
    return _group_problem(meta, cols)


def to_gptq(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    bits = meta["bits"]
    rows, cols = tensors["codes"].shape
    if "g_idx" in tensors:
        g_idx = tensors["g_idx"].to(torch.int32)
    else:
        g_idx = (torch.arange(cols) // min(meta["group_size"], cols)).to(torch.int32)
    return {
        "qweight": pack_rows_int32(tensors["codes"], bits).T.contiguous(),
        "qzeros": pack_rows_int32(tensors["zeros"].T, bits),  # v2: the zero itself
        "scales": tensors["scales"].T.contiguous(),
        "g_idx": g_idx.contiguous(),
    }


# --------------------------------------------------------------------------------------------------
# GGUF


def gguf_exact_type(meta: dict[str, Any]) -> str | None:
    """The smallest GGUF type whose blocks hold every c - z this width and symmetry can produce."""
    low, high = _delta_range(meta)
    for name in GGUF_EXACT:
        lo, hi = _GGUF_RANGE[name]
        if lo <= low and high <= hi:
            return name
    return None


def gguf_problem(meta: dict[str, Any], rows: int, cols: int, has_g_idx: bool, qtype: str) -> str | None:
    """None if `qtype` (a GGUF type name) can hold the linear (exactly, or Q4_1 approximately)."""
    if has_g_idx:
        return "act-order g_idx: GGUF blocks are 32 consecutive columns with one scale"
    if cols % GGUF_BLOCK:
        return f"in_features {cols} is not a multiple of GGUF's 32-column blocks"
    if not per_row(meta, cols) and meta["group_size"] % GGUF_BLOCK:
        return f"group size {meta['group_size']} is not a multiple of GGUF's 32-column blocks"
    if qtype == "Q4_1":
        if meta["bits"] > 4:
            return f"{meta['bits']}-bit codes do not fit Q4_1's 4-bit q"
        return None
    low, high = _delta_range(meta)
    lo, hi = _GGUF_RANGE[qtype]
    if low < lo or high > hi:
        kind = "symmetric" if meta["sym"] else "asymmetric"
        better = gguf_exact_type(meta)
        return f"{kind} {meta['bits']}-bit (c - z in [{low}, {high}]) does not fit {qtype}'s [{lo}, {hi}]" + (
            f"; {better} holds it exactly" if better else ""
        )
    return None


def _gguf_blocks(tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
    """Per 32-column block: its (fp16) scale, its zero and its codes: [rows, blocks], [rows, blocks],
    [rows, blocks, 32]."""
    rows, cols = tensors["codes"].shape
    blocks = cols // GGUF_BLOCK
    per_group = max(1, min(meta["group_size"], cols) // GGUF_BLOCK)
    block_group = torch.arange(blocks) // per_group
    scales = tensors["scales"][:, block_group]
    zeros = tensors["zeros"][:, block_group].to(torch.int16)
    codes = tensors["codes"].to(torch.int16).reshape(rows, blocks, GGUF_BLOCK)
    return scales, zeros, codes


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] in [0, 16) -> [..., 16] bytes: element j in the low nibble, j + 16 in the high one."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def to_gguf(tensors: dict[str, torch.Tensor], meta: dict[str, Any], qtype: str) -> np.ndarray:
    """The linear as GGUF blocks: uint8 [rows, blocks * block bytes] (llama.cpp's block_q*
    structs, little-endian), row order as given."""
    scales, zeros, codes = _gguf_blocks(tensors, meta)
    rows, blocks = scales.shape
    d = scales.numpy().view(np.uint8).reshape(rows, blocks, 2)
    if qtype == "Q4_1":
        m = (-(scales.float() * zeros.float())).half().numpy().view(np.uint8).reshape(rows, blocks, 2)
        q = codes.numpy().astype(np.uint8)
        body = [d, m, _nibbles(q)]
    else:
        offset = {"Q8_0": 0, "Q5_0": 16, "Q4_0": 8}[qtype]
        delta = (codes - zeros.unsqueeze(-1)).numpy()
        q = (delta + offset).astype(np.int16)
        if qtype == "Q8_0":
            body = [d, q.astype(np.int8).view(np.uint8)]
        elif qtype == "Q4_0":
            body = [d, _nibbles(q.astype(np.uint8))]
        else:  # Q5_0: fp16 d, uint32 of the fifth bits (bit j: element j), 16 bytes of low nibbles
            high = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
            qh = np.bitwise_or.reduce(high, axis=-1).astype("<u4").view(np.uint8).reshape(rows, blocks, 4)
            body = [d, qh, _nibbles((q & 0xF).astype(np.uint8))]
    return np.concatenate(body, axis=-1).reshape(rows, -1)


def gguf_dequantized_block_values(tensors: dict[str, torch.Tensor], meta: dict[str, Any], qtype: str) -> torch.Tensor:
    """What llama.cpp's dequantize computes from `to_gguf`'s blocks, in float32 (Q4_1: d * q + m with m
    rounded to fp16; the exact types: the layout's own decode)."""
    scales, zeros, codes = _gguf_blocks(tensors, meta)
    rows = scales.shape[0]
    if qtype == "Q4_1":
        m = (-(scales.float() * zeros.float())).half().float()
        return (scales.float().unsqueeze(-1) * codes.float() + m.unsqueeze(-1)).reshape(rows, -1)
    return (scales.float().unsqueeze(-1) * (codes - zeros.unsqueeze(-1)).float()).reshape(rows, -1)
