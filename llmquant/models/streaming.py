"""Streaming quantization's model: built on the meta device, its decoder layers read from the
checkpoint's safetensors one at a time (issue #17).

`open_streamed` builds the model of a local HF directory with every tensor on the meta device,
then reads what the run needs before the first layer (embeddings, final norm, rotary tables: every
tensor outside the decoder layers except an untied output head) into host memory. The runner asks
for one decoder layer at a time (`materialize`) and hands it back when done (`release`), so that the
host holds the embeddings, one layer and the calibration activations, whatever the model's size.
The checkpoint is written from the same files: `plain_tensors` gives every tensor the output keeps
as a `LazyTensor` that reads (and casts) it only when the writer reaches it.

The values are those `load_pretrained` gives: each tensor is read from its file and cast to the
dtype the meta model holds for it (the compute dtype, or float32 where the model keeps a module in
float32), non-persistent buffers (rotary tables, Gemma's embedding scale) are computed by the
model's own `_init_weights`, and tied weights are tied by the model's `tie_weights`. So a streamed
run writes the same bytes as a run on the whole model (tests/test_streaming.py).

Streaming applies to local directories whose safetensors hold the model's own tensor names (a
single model.safetensors, or shards listed by model.safetensors.index.json). Anything else (a hub
id, a GGUF file, .bin weights, checkpoints whose names transformers would rewrite) is loaded whole
by `load_pretrained`, as before; `streamable` says which, and why not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmquant.errors import UserError
from llmquant.models.loading import ModelSource, error_summary, model_load_errors
from llmquant.provenance import large_allocations_unmapped, release_memory
from llmquant.safetensors_io import DTYPES, LazyTensor, read_header

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class TensorIndex:
    """Where each tensor of a directory's safetensors lives; reads one tensor at a time."""

    def __init__(self, directory: Path, files: dict[str, Path]):
        self.directory = directory
        self.files = files  # tensor name -> file
        self._headers: dict[Path, Any] = {}

    @classmethod
    def of(cls, directory: str | Path) -> "TensorIndex | None":
        """The index of `directory`'s safetensors; None when it has none (UserError if damaged)."""
        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise UserError(f"{index_path}: not a readable shard index ({error_summary(error)})") from None
            files = {str(name): directory / str(file) for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise UserError(f"{index_path}: lists {file.name}, which is missing")
            return cls(directory, files)
        single = directory / SINGLE_FILE
        if single.is_file():
            index = cls(directory, {})
            index.files = {name: single for name in index.header(single).entries}
            return index
        return None

    def header(self, path: Path):
        if path not in self._headers:
            try:
                self._headers[path] = read_header(path)
            except (OSError, ValueError) as error:
                raise UserError(f"{path}: not a readable safetensors file ({error_summary(error)})") from None
        return self._headers[path]

    def entry(self, name: str):
        path = self.files[name]
        entry = self.header(path).entries.get(name)
        if entry is None:
            raise UserError(f"{self.directory / INDEX_FILE}: lists {name} in {path.name}, which does not hold it")
        return path, entry

    def dtype(self, name: str) -> torch.dtype:
        _, entry = self.entry(name)
        if entry.dtype not in TORCH_DTYPES:
            raise UserError(f"{self.files[name]}: tensor {name} has dtype {entry.dtype}, which llmquant cannot stream")
        return TORCH_DTYPES[entry.dtype]

    def load(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype), read into host memory."""
        path, entry = self.entry(name)
        dtype = self.dtype(name)
        nbytes = entry.end - entry.begin
        tensor = torch.empty(entry.shape, dtype=dtype)
        if not nbytes:
            return tensor
        with open(path, "rb", buffering=0) as handle:  # straight into the tensor: no buffer to free
            handle.seek(entry.begin)
            if handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != nbytes:
                raise UserError(f"{path}: truncated (tensor {name})")
        return tensor

    def sample(self, name: str, count: int = 4096) -> torch.Tensor:
        """`flat[:: max(1, numel // count)]` of the stored tensor, touching only the pages it reads."""
        path, entry = self.entry(name)
        dtype = self.dtype(name)
        size = torch.empty(0, dtype=dtype).element_size()
        numel = (entry.end - entry.begin) // size
        if not numel:
            return torch.empty(0, dtype=dtype)
        mapped = np.memmap(path, dtype=_UNSIGNED[size], mode="r", offset=entry.begin, shape=(numel,))
        picked = np.array(mapped[:: max(1, numel // count)])  # a writable copy
        del mapped
        return torch.from_numpy(picked).view(dtype)


def _tie_sources(model: nn.Module) -> dict[str, str]:
    """Tied parameter name -> the name it is tied to (transformers' all_tied_weights_keys)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {str(target): str(source) for target, source in dict(tied).items()}


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    value._is_hf_initialized = True  # type: ignore[attr-defined] - transformers' init functions skip it
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
        module._parameters[attr]._is_hf_initialized = True  # type: ignore[union-attr]
    else:
        module._buffers[attr] = value


class StreamedModel:
    """A model whose decoder layers live in the checkpoint's files until the runner needs them."""

    def __init__(self, model: nn.Module, index: TensorIndex, layers_path: str, description: str):
        self.model = model
        self.index = index
        self.layers_path = layers_path
        self.description = description
        self.tie_sources = _tie_sources(model)
        self.state_names = list(model.state_dict().keys())

    # Names ---------------------------------------------------------------------------------------

    def file_name(self, name: str) -> str:
        """The name under which `name`'s values are stored (a tied weight: its source's)."""
        if name in self.index.files:
            return name
        source = self.tie_sources.get(name)
        if source is not None and source in self.index.files:
            return source
        raise UserError(f"cannot load model {self.description}: tensor {name} is missing from its weights")

    def _layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def _in_layers(self, name: str) -> bool:
        return name.startswith(self.layers_path + ".")

    def _value(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """`name` read from its file and cast as load_pretrained casts it (to the meta model's dtype)."""
        tensor = self.index.load(self.file_name(name))
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    # Loading -------------------------------------------------------------------------------------

    def _load_into(self, root: nn.Module, prefix: str, names: list[str]) -> None:
        state = root.state_dict(keep_vars=True)
        for local in names:
            name = prefix + local
            value = self._value(name, state[local].dtype)
            if tuple(value.shape) != tuple(state[local].shape):
                raise UserError(
                    f"cannot load model {self.description}: tensor {name} has shape {list(value.shape)}, "
                    f"the model's config asks for {list(state[local].shape)}"
                )
            if value.is_floating_point() and value.numel():
                low, high = torch.aminmax(value)
                if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
                    raise UserError(f"model {self.description}: tensor {name} contains NaN/Inf")
            _set_tensor(root, local, value)
        self._init_meta_buffers(root)

    def _init_meta_buffers(self, root: nn.Module) -> None:
        """Non-persistent buffers (rotary tables, embedding scales) computed as transformers does."""
        init = getattr(self.model, "_init_weights", None)
        for module in root.modules():
            meta = [key for key, buffer in module._buffers.items() if buffer is not None and buffer.is_meta]
            if not meta:
                continue
            for key in meta:
                module._buffers[key] = torch.empty_like(module._buffers[key], device="cpu")
            if init is None:
                raise UserError(f"cannot stream model {self.description}: buffers {meta} have no initialiser")
            with torch.no_grad():
                init(module)

    def load_outer(self) -> None:
        """Everything outside the decoder layers that a run reads (all but an untied output head)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_names = set()
        if head is not None:
            head_prefix = next((n for n, m in self.model.named_modules() if m is head), None)
            if head_prefix:
                head_names = {f"{head_prefix}.{k}" for k in head.state_dict()}
        tied_targets = set(self.tie_sources)
        names = [
            n for n in self.state_names
            if not self._in_layers(n) and n not in tied_targets and n not in head_names
        ]  # fmt: skip
        self._load_into(self.model, "", names)
        if tied_targets and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def check_finite(self) -> None:
        """quantize's check before any work (a NaN/Inf is a broken input file, exit 2): every stored
        tensor read once, one at a time, as loading the whole model would have read it."""
        for name in sorted(set(self.index.files)):
            tensor = self.index.load(name)
            if tensor.is_floating_point() and tensor.numel():
                low, high = torch.aminmax(tensor)
                if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
                    raise UserError(f"model {self.description}: tensor {name} contains NaN/Inf")

    def materialize(self, index: int, layer: nn.Module) -> None:
        """Reads decoder layer `index` from the files (no-op if it is already in memory)."""
        tensors = list(layer.parameters()) + [b for b in layer.buffers() if b is not None]
        if not any(t.is_meta for t in tensors):
            return
        prefix = self._layer_prefix(index)
        self._load_into(layer, prefix, list(layer.state_dict().keys()))

    def release_outer(self) -> None:
        """Once the calibration inputs are captured, nothing reads the weights outside the decoder
        layers (the embeddings above all: vocabulary x hidden, 2 GB in float32 at 70B): the output is
        written from the files. Their parameters go back to the meta device (tied ones included);
        buffers (rotary tables) stay."""
        stand_ins: dict[int, nn.Parameter] = {}  # one per original: tied weights stay one parameter
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):
            if self._in_layers(name) or param.is_meta:
                continue
            if id(param) not in stand_ins:
                stand_ins[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name) if module_name else self.model
            module._parameters[attr] = stand_ins[id(param)]
        release_memory()

    def release(self, index: int, layer: nn.Module) -> None:
        """Hands the layer's memory back: its tensors go back to the meta device, and the freed heap
        to the system (glibc keeps freed memory of smaller allocations otherwise)."""
        layer.to("meta")
        release_memory()

    # What the run records and writes ----------------------------------------------------------------

    def identity(self) -> dict[str, str]:
        """resume.model_identity of the loaded model, computed from the files (same digest)."""
        config = json.loads(self.model.config.to_json_string()) if hasattr(self.model, "config") else {}
        config.pop("transformers_version", None)
        digest = hashlib.sha256()
        state = self.model.state_dict(keep_vars=True)
        for name in sorted(state):
            tensor = state[name]
            if tensor.is_meta:
                sample = self.index.sample(self.file_name(name))
                if sample.is_floating_point():
                    sample = sample.to(tensor.dtype)
            else:
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 4096)]
            sample = sample.to("cpu", torch.float32) if sample.is_floating_point() else sample.to("cpu", torch.int64)
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(sample.contiguous().numpy().tobytes())
        config_sha256 = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        return {"source": self.description, "config_sha256": config_sha256, "weights_sample_sha256": digest.hexdigest()}

    def plain_tensors(self, skip: set[str], dtype: torch.dtype) -> dict[str, Any]:
        """What checkpoint._plain_tensors gives for the whole model after `model.to(dtype)`: every
        tensor but `skip`, each tied pair once (its source), floating ones in `dtype`; lazily read."""
        state = self.model.state_dict(keep_vars=True)
        tied_targets = set(self.tie_sources)
        out: dict[str, Any] = {}
        for name, tensor in state.items():
            if name in skip:
                continue
            if name in tied_targets and self.tie_sources[name] in state and not state[name].is_meta:
                continue  # tied in memory: written once, under its source's name
            if name in tied_targets and name not in self.index.files:
                continue
            target = dtype if tensor.is_floating_point() else tensor.dtype
            if tensor.is_meta:
                compute = tensor.dtype
                load = self._reader(name, compute, target)
            else:
                held = tensor.detach()
                load = (lambda held=held, target=target: held.to("cpu", target, copy=True).contiguous())
            out[name] = LazyTensor(target, tuple(tensor.shape), load)
        return out

    def _reader(self, name: str, compute: torch.dtype, target: torch.dtype) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            value = self._value(name, compute)
            return value.to(target) if value.is_floating_point() else value

        return load


def streamable(source: ModelSource) -> str | None:
    """None if `source` can be streamed, else why not (one phrase)."""
    if source.kind != "dir":
        return {"hub": "a hub id", "gguf": "a GGUF file"}.get(source.kind, source.kind)
    directory = Path(source.location)
    if not (directory / INDEX_FILE).is_file() and not (directory / SINGLE_FILE).is_file():
        return "no model.safetensors or model.safetensors.index.json"
    return None


def open_streamed(
    source: ModelSource, dtype: torch.dtype, layers_path_of: Callable[[nn.Module], str], load_outer: bool = True
) -> StreamedModel | None:
    """The model of `source` on the meta device with its outer tensors loaded (unless `load_outer` is
    False: a data-free method runs no forward pass), or None (logged) when its files do not hold the
    model's own tensor names (then load_pretrained applies)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    index = TensorIndex.of(source.location)
    if index is None:
        return None
    large_allocations_unmapped()
    try:
        config = AutoConfig.from_pretrained(source.location)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except model_load_errors() as error:
        raise UserError(f"cannot load model {source.describe()}: {error_summary(error)}") from None
    tied = _tie_sources(model)
    missing = [n for n in model.state_dict() if n not in index.files and not (n in tied and tied[n] in index.files)]
    if missing:
        log.info(
            "%s: its files do not hold %s (%d tensor(s)) under the model's own names; loading it whole",
            source.describe(), missing[0], len(missing),
        )  # fmt: skip
        return None
    model.eval()
    model.config.use_cache = False
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(source.location)
        except OSError:
            pass
    streamed = StreamedModel(model, index, layers_path_of(model), source.describe())
    if load_outer:
        streamed.load_outer()
    return streamed
