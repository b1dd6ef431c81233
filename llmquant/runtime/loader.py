"""Loading a model to run it: `load_model` takes anything a user names (a packed llmquant
checkpoint, a fake-quant or plain HF directory, a hub id, a .gguf file, an alias) and returns the
model, its tokenizer and its source; `load_quantized` is the packed path.

A packed checkpoint -> a transformers model whose quantized linears are QuantizedLinear modules
holding the packed tensors (docs/format.md). The model is built from config.json with its parameters
on the meta device, so no full-size random weights are ever allocated; the quantized linears are
swapped for QuantizedLinear modules built straight from the stored tensors, then the remaining
tensors are assigned and tied weights re-tied. transformers does not know quant_method "llmquant",
so the quantization_config never reaches it.

Loading never decodes a packed linear: the checkpoint reader checks structure and checksums
(llmquant/formats/checkpoint.py), and each weight is decoded at its first forward. `check_loadable`
runs the whole assembly on the meta device (what `pack` and `verify` check a checkpoint with).
"""

from __future__ import annotations

from pathlib import Path

import contextlib
import dataclasses
import time
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from llmquant.devices import resolve_device, resolve_dtype
from llmquant.errors import UserError
from llmquant.formats import packers
from llmquant.formats.checkpoint import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    WEIGHTS_FILE,
    Checkpoint,
    convert,
    is_packed_checkpoint,
    read_checkpoint,
    verify_weights,
)
from llmquant.models.loading import (
    ModelSource,
    error_summary,
    load_pretrained,
    load_tokenizer,
    model_load_errors,
    resolve_model_source,
)
from llmquant.runtime.qlinear import QuantizedLinear

GENERATION_CONFIG_FILE = "generation_config.json"


def load_model(spec: str, dtype: str = "auto", device: str = "auto") -> tuple[PreTrainedModel, object, ModelSource]:
    """Any model a user names -> (model, tokenizer, source), the model on the CPU in `dtype`
    ("auto": float32 when `device` is the CPU, else the checkpoint's own). A packed llmquant
    checkpoint loads with its QuantizedLinear modules (backend "torch" until the caller chooses,
    see qlinear.resolve_backend); everything else through transformers."""
    source = resolve_model_source(spec)
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    if source.kind == "dir" and is_packed_checkpoint(source.location):
        model = load_quantized(source.location, dtype=None if torch_dtype == "auto" else torch_dtype)
    else:
        if source.kind == "dir":
            verify_weights(source.location)  # an llmquant-written (fake) checkpoint: its checksums
        model = load_pretrained(source, torch_dtype)
    return model, load_tokenizer(spec), source


def load_quantized(
    directory: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """Load a packed llmquant checkpoint. dtype: of the non-quantized tensors and the compute
    (default: the checkpoint's model dtype). Raises UserError for anything wrong with the files."""
    directory = Path(directory)
    checkpoint = read_checkpoint(directory, packed_only=True)
    resolved = resolve_dtype(dtype)
    dtype = resolved if isinstance(resolved, torch.dtype) else checkpoint.model_dtype
    model = build_model(checkpoint, dtype, directory)
    if (directory / GENERATION_CONFIG_FILE).is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            raise UserError(f"{directory / GENERATION_CONFIG_FILE}: {' '.join(str(exc).split())}") from None
    return model.to(device).eval()


def build_model(checkpoint: Checkpoint, dtype: torch.dtype, directory: Path) -> PreTrainedModel:
    """The model of the checkpoint's config.json with its quantized linears swapped for
    QuantizedLinear modules and every other tensor assigned (consumes `checkpoint.plain`'s biases).
    UserError for anything that does not fit the config."""
    model = _empty_model(checkpoint, dtype, directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    install_linears(model, checkpoint, dtype, weights_path)
    _load_plain(model, checkpoint.plain, dtype, weights_path)
    return model


def check_loadable(checkpoint: Checkpoint, directory: Path) -> None:
    """Everything `load_quantized` would check of a read checkpoint against the model its
    config.json describes (module names and shapes, biases, every plain tensor's place, shape and
    kind, nothing missing): the model is assembled around the tensors already read and dropped."""
    build_model(dataclasses.replace(checkpoint, plain=dict(checkpoint.plain)), checkpoint.model_dtype, directory)


def model_skeleton(checkpoint: Checkpoint, directory: Path) -> PreTrainedModel:
    """The model of the checkpoint's config.json with every parameter on the meta device (its module
    names and kinds, no weights): what exports ask which linears a loader will look for."""
    return _empty_model(checkpoint, checkpoint.model_dtype, Path(directory) / CONFIG_FILE)


def pack_checkpoint(
    src: str | Path,
    dst: str | Path,
    fmt: str,
    dtype: torch.dtype | str | None = None,
    force: bool = False,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """`llmquant pack`: convert (llmquant/formats) with the source checked as strictly as loading it
    would be, so that a checkpoint that would not load is never written."""
    convert(src, dst, fmt, dtype=dtype, force=force, check=check_loadable, max_shard_bytes=max_shard_bytes)


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """`llmquant verify`: every check a load makes (structure, checksums, the binding of the weights
    to config.json or the sidecar, the model of config.json), plus every linear decoded. Returns a
    JSON-able report; UserError naming the file and tensor at the first problem, and for a
    checkpoint without checksums (nothing to verify its bytes against)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory not found: {directory}")
    start = time.perf_counter()
    checkpoint = read_checkpoint(directory)
    for file in checkpoint.files:
        if file["checksums"] != "verified":
            raise UserError(
                f"{directory / file['file']}: no checksums recorded (written by an llmquant before they were); "
                "`llmquant pack` rewrites it with them"
            )
    for name, linear in checkpoint.linears.items():
        try:
            packers.unpack(linear)
        except ValueError as exc:
            raise UserError(f"{directory}: {name}: {' '.join(str(exc).split())}") from None
    check_loadable(checkpoint, directory)
    seconds = time.perf_counter() - start
    total = sum(f["bytes"] for f in checkpoint.files)
    return {
        "checkpoint": str(directory),
        "format": checkpoint.fmt,
        "ok": True,
        "files": checkpoint.files,
        "tensors": sum(f["tensors"] for f in checkpoint.files),
        "bytes": total,
        "linears": len(checkpoint.linears),
        "seconds": seconds,
    }


def _empty_model(checkpoint: Checkpoint, dtype: torch.dtype, config_path: Path) -> PreTrainedModel:
    model_type = checkpoint.config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UserError(f"{config_path}: model_type {model_type!r} is not known to this transformers version")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(checkpoint.config)
        # Parameters go to the meta device; buffers (rotary inv_freq, ...) are computed for real,
        # because checkpoints do not store the non-persistent ones. Random initialisation of the
        # (meta) parameters is skipped, as from_pretrained does: it was a third of the load time.
        with init_empty_weights(include_buffers=False), _no_init_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except model_load_errors() as exc:
        raise UserError(f"{config_path}: cannot build a causal LM from it ({' '.join(error_summary(exc).split())})") from None


def _no_init_weights():
    """transformers' context that skips weight initialisation (moved between versions)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def install_linears(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype, path: Path) -> None:
    for name, linear in checkpoint.linears.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path}: packed linear {name} is not a module of the model in config.json") from None
        rows, cols = linear.shape
        if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != (rows, cols):
            raise UserError(f"{path}: {name} is packed as {rows}x{cols}, but config.json makes it {module}")
        bias = checkpoint.plain.pop(f"{name}.bias", None)
        if (bias is None) != (module.bias is None) or (bias is not None and tuple(bias.shape) != (rows,)):
            found = "no bias" if bias is None else f"a bias of shape {tuple(bias.shape)}"
            raise UserError(f"{path}: {name} has {found}, config.json makes it {module}")
        parent, _, child = name.rpartition(".")
        quantized = QuantizedLinear(linear, bias.to(dtype) if bias is not None else None)
        setattr(model.get_submodule(parent), child, quantized)


def _load_plain(model: nn.Module, plain: dict[str, torch.Tensor], dtype: torch.dtype, path: Path) -> None:
    state = model.state_dict(keep_vars=True)
    quantized = {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLinear)
        for key in module.state_dict()
    }
    expected = set(state) - quantized
    unexpected = sorted(set(plain) - expected)
    if unexpected:
        raise UserError(
            f"{path}: tensor {unexpected[0]} ({len(unexpected)} unexpected in all) has no place in the model "
            "of config.json"
        )
    for key, tensor in plain.items():
        if tensor.shape != state[key].shape:
            raise UserError(f"{path}: {key} has shape {list(tensor.shape)}, config.json needs {list(state[key].shape)}")
        if tensor.is_floating_point() != state[key].is_floating_point():
            raise UserError(f"{path}: {key} is stored as {tensor.dtype}, the model needs {state[key].dtype}")
    cast = {key: t.to(dtype) if t.is_floating_point() else t.to(state[key].dtype) for key, t in plain.items()}
    try:
        model.load_state_dict(cast, strict=False, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: cannot load its tensors into the model ({' '.join(str(exc).split())[:300]})") from None
    model.tie_weights()  # e.g. lm_head <- embed_tokens: stored once (see checkpoint._plain_tensors)
    missing = sorted(key for key, t in model.state_dict(keep_vars=True).items() if t.is_meta)
    if missing:
        raise UserError(f"{path}: tensor {missing[0]} ({len(missing)} missing in all) is missing")
