"""`llmquant pack --format compressed-tensors|gptq|gguf`: check everything the target must hold,
then write it atomically.

Order (nothing is written before the last check passed; nothing is decoded before the cheap
checks passed): output path, the source read and checked as strictly as loading it, every linear's
layout and meta against the target (one line naming the first linear that does not fit and why),
then the linears unpacked (and widened with --sym-widen), then the files.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmquant.errors import UserError
from llmquant.formats import packers
from llmquant.formats.checkpoint import CONFIG_FILE, RECORDS_FILE, REPORT_FILE, WEIGHTS_FILE, Checkpoint, read_pack_source
from llmquant.layouts.uniform import export as uniform_export
from llmquant.output import MANIFEST_FILE, atomic_output_dir
from llmquant.runtime.loader import check_loadable, model_skeleton

EXPORT_FORMATS = ("compressed-tensors", "gptq", "gguf")
EXPORT_INFO_FILE = "llmquant-export.json"  # what was exported from where, per linear (never read back)
# Where the layouts without an exact home in the export formats live (docs/format.md).
NATIVE_HOMES = "llmquant's native and fake formats (llmquant pack --format packed|fake)"
_SKIPPED = {CONFIG_FILE, WEIGHTS_FILE, RECORDS_FILE, MANIFEST_FILE, REPORT_FILE}


@dataclass
class ExportLinear:
    """One linear as the target stores it: the layout's record tensors (widened if asked) and meta,
    plus the GGUF type chosen for it."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    widened: bool = False
    gguf_type: str | None = None
    max_abs_delta: float | None = None  # gguf: |what llama.cpp decodes - llmquant's decode|, max


def _describe(meta: dict[str, Any], cols: int) -> str:
    group = "per-row" if uniform_export.per_row(meta, cols) else f"g{meta['group_size']}"
    return f"{'sym' if meta['sym'] else 'asym'} {meta['bits']}-bit {group}"


def _widened_meta(meta: dict[str, Any], sym_widen: bool) -> dict[str, Any]:
    if sym_widen and not meta["sym"]:
        return {**meta, "bits": meta["bits"] + 1, "sym": True}
    return meta


def check_linears(
    checkpoint: Checkpoint, fmt: str, sym_widen: bool = False, gguf_type: str = "auto", allow_approximate: bool = False
) -> dict[str, str | None]:
    """Every linear against the target, from the descriptors alone (no decoding). Returns the GGUF
    type per linear (None for the other formats); UserError naming the first linear that does not fit."""
    types: dict[str, str | None] = {}
    first: tuple[str, tuple, str] | None = None
    for name, linear in sorted(checkpoint.linears.items()):
        rows, cols = linear.shape
        if linear.layout != "uniform":
            raise UserError(
                f"{name}: the {linear.layout} layout has no exact home in {fmt} (per-group widths, binary planes with "
                f"a mean or sparse salient weights); it is held by {NATIVE_HOMES}"
            )
        has_g_idx = "g_idx" in linear.tensors
        if sym_widen and not linear.meta["sym"]:
            problem = uniform_export.widen_problem(linear.meta)
            if problem:
                raise UserError(f"{name}: {problem}")
        meta = _widened_meta(linear.meta, sym_widen)
        qtype = None
        if fmt == "compressed-tensors":
            problem = uniform_export.ct_problem(meta, rows, cols, has_g_idx)
        elif fmt == "gptq":
            problem = uniform_export.gptq_problem(meta, rows, cols, has_g_idx)
            key = (meta["bits"], meta["sym"], uniform_export.per_row(meta, cols) or meta["group_size"], has_g_idx)
            if problem is None and first is not None and key != first[1]:
                problem = (
                    f"{_describe(meta, cols)}{' act-order' if has_g_idx else ''} differs from {first[0]}'s {first[2]}; "
                    "a GPTQ checkpoint has one bits/group_size/sym/desc_act for all its linears "
                    "(--format compressed-tensors holds several)"
                )
            first = first or (name, key, _describe(meta, cols) + (" act-order" if has_g_idx else ""))
        else:
            problem = None
            if gguf_type == "auto":
                qtype = uniform_export.gguf_exact_type(meta)
                problem = None if qtype else f"{_describe(meta, cols)}: no exact GGUF type holds it"
            else:
                qtype = gguf_type.upper()
                if qtype in uniform_export.GGUF_APPROXIMATE and not allow_approximate:
                    raise UserError(
                        f"--gguf-type {gguf_type}: {qtype} re-rounds the zero points (m = -s*z in fp16), so the export "
                        "is not exact; pass --allow-approximate to write it and measure its KL against the native model"
                    )
            if problem is None:
                problem = uniform_export.gguf_problem(meta, rows, cols, has_g_idx, qtype)
        if problem:
            raise UserError(f"{name}: {problem}")
        types[name] = qtype
    return types


def unquantized_linears(checkpoint: Checkpoint, directory: Path) -> list[str]:
    """The nn.Linear modules of the checkpoint's model that are not quantized (lm_head, skipped
    ones), from the model of its config.json built on the meta device."""
    model = model_skeleton(checkpoint, directory)
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in checkpoint.linears
    )


def export_checkpoint(
    src: str | Path,
    dst: str | Path,
    fmt: str,
    *,
    sym_widen: bool = False,
    dtype: torch.dtype | None = None,
    gguf_type: str = "auto",
    allow_approximate: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Write the llmquant checkpoint `src` as `fmt` into the directory `dst`; returns a JSON-able
    summary (format, files, bytes, per-linear types, widened linears)."""
    from llmquant.export import gguf, hf

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if gguf_type != "auto" and fmt != "gguf":
        raise UserError(f"--gguf-type applies to --format gguf, not {fmt}")
    if gguf_type != "auto" and gguf_type.upper() not in uniform_export.GGUF_EXACT + uniform_export.GGUF_APPROXIMATE:
        choices = ", ".join(t.lower() for t in uniform_export.GGUF_EXACT + uniform_export.GGUF_APPROXIMATE)
        raise UserError(f"--gguf-type: expected auto or one of {choices}, got {gguf_type!r}")
    src, dst, checkpoint = read_pack_source(src, dst, force, "pack")
    if not checkpoint.linears:
        raise UserError(f"{src}: no quantized linears to export")
    if fmt == "gguf":
        gguf.check(checkpoint, src)
    types = check_linears(checkpoint, fmt, sym_widen, gguf_type, allow_approximate)
    check_loadable(checkpoint, src)
    skipped = unquantized_linears(checkpoint, src)
    if fmt == "gptq":
        inside = [name for name in skipped if re.search(r"\.layers?\.\d+\.", name)]
        if inside:
            raise UserError(
                f"{inside[0]}: not quantized; GPTQ loaders expect every linear of the decoder layers quantized alike "
                "(--format compressed-tensors can leave linears out)"
            )
    linears = {}
    for name, linear in sorted(checkpoint.linears.items()):
        try:
            tensors = packers.unpack(linear)
        except ValueError as exc:
            raise UserError(f"{src}: {name}: {' '.join(str(exc).split())}") from None
        meta = dict(linear.meta)
        widened = sym_widen and not meta["sym"]
        if widened:
            tensors, meta = uniform_export.widen_sym(tensors, meta)
        linears[name] = ExportLinear(name, tensors, meta, widened, types[name])
        if types[name] is not None:
            # What llama.cpp will compute from the blocks, against the layout's decode: 0 for the exact types.
            held = uniform_export.gguf_dequantized_block_values(tensors, meta, types[name])
            linears[name].max_abs_delta = float((held - packers.dequantize(linear)).abs().max())
    target = dtype or checkpoint.model_dtype
    with atomic_output_dir(dst, force, inputs=[src]) as partial:
        if fmt == "gguf":
            files = gguf.write_gguf(checkpoint, linears, src, partial, target)
        else:
            files = hf.write_hf(checkpoint, linears, skipped, fmt, partial, target)
            for path in src.iterdir():  # tokenizer, generation config, chat template
                if path.is_file() and path.name not in _SKIPPED:
                    shutil.copy2(path, partial / path.name)
        summary = {
            "source": str(src),
            "output": str(dst),
            "format": fmt,
            "files": files,
            "bytes": sum((partial / f).stat().st_size for f in files),
            "linears": {
                name: {"shape": list(checkpoint.linears[name].shape), "as": _describe(e.meta, checkpoint.linears[name].shape[1]),
                       "widened": e.widened,
                       **({"gguf_type": e.gguf_type, "max_abs_delta": e.max_abs_delta} if e.gguf_type else {})}
                for name, e in linears.items()
            },
            "unquantized_linears": skipped,
        }
        (partial / EXPORT_INFO_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
