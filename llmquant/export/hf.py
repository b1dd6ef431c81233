"""The Hugging Face-directory exports: config.json with the target's quantization_config and one
model.safetensors holding the plain tensors (in the chosen dtype) and each linear's tensors under
the names its loaders look for (compressed-tensors: `<linear>.weight_packed`, ...; GPTQ:
`<linear>.qweight`, ...). The tensor layouts are the uniform layout's (layouts/uniform/export.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmquant.formats.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpoint
from llmquant.layouts.uniform import export as uniform_export
from llmquant.safetensors_io import write_safetensors

if TYPE_CHECKING:
    from llmquant.export.plan import ExportLinear


def write_hf(
    checkpoint: Checkpoint,
    linears: dict[str, "ExportLinear"],
    skipped: list[str],
    fmt: str,
    directory: Path,
    dtype: torch.dtype,
) -> list[str]:
    tensors = {key: t.to(dtype) if t.is_floating_point() else t for key, t in checkpoint.plain.items()}
    for name, linear in linears.items():
        if fmt == "gptq":
            stored = uniform_export.to_gptq(linear.tensors, linear.meta)
        else:
            stored = uniform_export.to_compressed_tensors(linear.tensors, linear.meta)
        tensors.update({f"{name}.{key}": t for key, t in stored.items()})
    write_safetensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    config = {key: value for key, value in checkpoint.config.items() if key != "quantization_config"}
    config["dtype"] = str(dtype).removeprefix("torch.")
    if fmt == "gptq":
        config["quantization_config"] = gptq_config(checkpoint, linears)
    else:
        config["quantization_config"] = compressed_tensors_config(checkpoint, linears, skipped)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [CONFIG_FILE, WEIGHTS_FILE]


def gptq_config(checkpoint: Checkpoint, linears: dict[str, "ExportLinear"]) -> dict[str, Any]:
    """One setting for every linear (checked by the planner), v2 zero points."""
    first = next(iter(linears.values()))
    cols = checkpoint.linears[first.name].shape[1]
    recipe = (checkpoint.quantization.get("info") or {}).get("recipe") or {}
    method = recipe.get("method") or {}
    return {
        "quant_method": "gptq",
        "bits": first.meta["bits"],
        "group_size": -1 if uniform_export.per_row(first.meta, cols) else first.meta["group_size"],
        "sym": bool(first.meta["sym"]),
        "desc_act": "g_idx" in first.tensors,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "damp_percent": float(method.get("percdamp", 0.01)),
        "pack_dtype": "int32",
        # v2: qzeros hold the zero points themselves (v1 stores zero - 1, which underflows at 0).
        "checkpoint_format": "gptq_v2",
        "format": "gptq_v2",
        "quantizer": ["llmquant"],
    }


def compressed_tensors_config(
    checkpoint: Checkpoint, linears: dict[str, "ExportLinear"], skipped: list[str]
) -> dict[str, Any]:
    """One config group per distinct setting; a single group targets every Linear and ignores the
    unquantized ones (lm_head, ...), several groups target their linears by exact name."""
    settings: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    for name, linear in linears.items():
        scheme = uniform_export.ct_scheme(linear.meta, checkpoint.linears[name].shape[1])
        key = json.dumps(scheme, sort_keys=True)
        settings[key] = scheme
        members.setdefault(key, []).append(name)
    groups = {}
    for index, key in enumerate(sorted(settings)):
        targets = ["Linear"] if len(settings) == 1 else [f"re:^{re.escape(name)}$" for name in members[key]]
        groups[f"group_{index}"] = {
            "targets": targets,
            "weights": settings[key],
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(skipped),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
