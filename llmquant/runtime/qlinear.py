"""QuantizedLinear: a linear layer that holds its packed tensors and computes with them.

The module keeps exactly what the checkpoint stores for the linear (docs/format.md), so a packed
model occupies packed size in memory:

- every bit-packed stream (uint8: codes, signs, masks, zero points) lives in one `blob` buffer, each
  stream starting at a 16-byte boundary (at most 15 bytes of padding per stream). Kernels read the
  blob as 32-bit words, with the streams' bit offsets, instead of a copy of each stream;
- every other stored tensor (fp16 scales and means, int32 indices) is a buffer of its own; floating
  ones are held as integer views of their bits, because `model.half()` / `model.to(dtype)` convert
  every floating-point buffer and would silently round them. `packed()` views them back.

Backends are the seam for kernels: a backend is a function (module, x) -> y registered under a
name; `module.backend` picks one per module (`set_backend` sets it for a whole model).

- "torch": the pure-torch reference every other backend must agree with. Every forward unpacks and
  decodes the weight with the layout's own `decode` (the record's definition), casts it to the
  activations' dtype and multiplies; nothing is cached (packed memory, slow).
- "torch-cached": the same numbers, with the decoded weight kept after the first forward: the
  speed of the dequantized model at the memory of an unpacked one (what `eval` uses on a CPU).
- "triton": fused dequantize-and-multiply kernels reading the packed tensors
  (llmquant/layouts/<layout>/kernels.py); CUDA, or the CPU through Triton's interpreter in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.formats import packers
from llmquant.formats.packers import PackedLinear

Backend = Callable[["QuantizedLinear", torch.Tensor], torch.Tensor]

# Same-width integer containers for floating-point stored tensors (see the module docstring).
_BIT_VIEWS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
STREAM_ALIGNMENT = 16  # bytes: each stream of the blob starts here, so 32-bit (and 128-bit) loads align


def torch_backend(module: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
    """Reference path: decode to float32, cast to the activations' dtype, F.linear. The cast matches
    what a fake-quant checkpoint stores (decoded weight in the model dtype), so both give the same
    outputs bit for bit."""
    return F.linear(x, module.dequantize().to(x.dtype), module.bias)


def cached_torch_backend(module: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
    """The reference path with the decoded weight kept after the first call: the same numbers, at
    the memory of an unpacked model. For evaluation and benchmarking on CPU, where decoding every
    linear on every forward would dominate the time."""
    weight = module.__dict__.get("_decoded")
    if weight is None or weight.dtype != x.dtype or weight.device != x.device:
        weight = module.dequantize().to(x.dtype)
        module.__dict__["_decoded"] = weight  # a plain attribute: not saved, not a buffer
    return F.linear(x, weight, module.bias)


def triton_backend(module: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
    """Fused kernels on the packed tensors (imported on first use: triton is an optional extra)."""
    from llmquant.runtime.kernels import packed_linear

    return packed_linear(module, x)


def cpu_backend(module: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
    """The layouts' C row decoders on the packed tensors (compiled on first use)."""
    from llmquant.runtime.cpu_kernels import packed_linear

    if x.device.type != "cpu":
        raise ValueError(f"backend cpu runs on the CPU, the input is on {x.device}")
    return packed_linear(module, x)


_BACKENDS: dict[str, Backend] = {
    "torch": torch_backend,
    "torch-cached": cached_torch_backend,
    "triton": triton_backend,
    "cpu": cpu_backend,
}


def register_backend(name: str, backend: Backend) -> None:
    """Add a forward implementation (e.g. a GPU dequant-matmul kernel) under `name`."""
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is already registered")
    _BACKENDS[name] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


BACKEND_CHOICES = ("auto", "torch", "torch-cached", "triton", "cpu")
# What each backend costs in memory, for the lines the commands print.
BACKEND_MEMORY = {
    "torch": "packed memory: every forward decodes the whole weight, pure PyTorch",
    "torch-cached": "dense memory: each weight decoded once and kept, pure PyTorch",
    "triton": "packed memory: fused low-bit GPU kernels",
    "cpu": "packed memory: C kernels decode one weight row at a time",
}


def resolve_backend(name: str, device: torch.device, dense_on_cpu: bool = False) -> str:
    """`auto` -> the backend packed linears use on `device`: the Triton kernels on CUDA (when
    triton is installed), the C kernels on a CPU (when they build), else the packed reference
    ("torch"); with `dense_on_cpu`, the decoded cache on a CPU ("torch-cached": evaluation, where
    the dense model's speed matters more than memory). Any other name must be a registered backend."""
    if name != "auto":
        _check_backend(name)
        return name
    if device.type == "cuda":
        from llmquant.runtime.kernels import triton_available

        if triton_available() is None:
            return "triton"
        return "torch"
    if dense_on_cpu:
        return "torch-cached"
    from llmquant.runtime.cpu_kernels import cpu_available

    problem = cpu_available()
    if problem is None:
        return "cpu"
    from llmquant.ui import warn_once

    warn_once(f"{problem}; packed linears fall back to the pure-PyTorch backend (slow)", __name__)
    return "torch"


def _check_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")


def set_backend(model: nn.Module, name: str) -> int:
    """Use backend `name` for every QuantizedLinear in `model`; returns how many modules it set.
    Memory a previous backend kept (a decoded weight, kernel tables) is released."""
    _check_backend(name)
    modules = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for module in modules:
        module.backend = name
        module.release_caches()
    return len(modules)


class QuantizedLinear(nn.Module):
    """Drop-in replacement for nn.Linear built from a linear's stored form (`PackedLinear`)."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None = None, backend: str = "torch"):
        super().__init__()
        _check_backend(backend)
        self.out_features, self.in_features = packed.shape
        self.backend = backend
        self._store(packed)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit {self.out_features} outputs")
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _store(self, packed: PackedLinear) -> None:
        """Holds `packed`'s tensors: the uint8 streams in the blob, the rest as buffers of their own."""
        self.layout = packed.layout
        self.meta = dict(packed.meta)
        self.encoding = dict(packed.encoding)
        self._stored_dtypes: dict[str, torch.dtype] = {}
        self.streams: dict[str, tuple[int, int]] = {}  # name -> (byte offset in the blob, bytes)
        offset = 0
        streams = {name: t for name, t in sorted(packed.tensors.items()) if t.dtype == torch.uint8 and t.dim() == 1}
        for name, tensor in streams.items():
            self.streams[name] = (offset, tensor.numel())
            offset += -(-tensor.numel() // STREAM_ALIGNMENT) * STREAM_ALIGNMENT
        device = next(iter(packed.tensors.values())).device if packed.tensors else torch.device("cpu")
        blob = torch.zeros(max(offset, STREAM_ALIGNMENT), dtype=torch.uint8, device=device)
        for name, tensor in streams.items():
            start, size = self.streams[name]
            blob[start : start + size] = tensor
        self.register_buffer("blob", blob)
        for name, tensor in packed.tensors.items():
            if name in streams:
                continue
            self._stored_dtypes[name] = tensor.dtype
            view = _BIT_VIEWS.get(tensor.dtype)
            self.register_buffer(f"stored_{name}", tensor.view(view) if view is not None else tensor)

    def replace_stored(self, tensors: dict[str, torch.Tensor], encoding: dict[str, Any]) -> None:
        """Swap the stored tensors for another encoding of the same weight (e.g. the triton
        backend's salient bitmap instead of a CSR index); the layout, meta and device are kept."""
        device = self.blob.device
        packed = PackedLinear(self.layout, (self.out_features, self.in_features), self.meta, {k: t.to(device) for k, t in tensors.items()}, encoding)
        for name in list(self._buffers):
            if name == "blob" or name.startswith("stored_"):
                del self._buffers[name]
        self._store(packed)
        self.release_caches()

    def stored(self, name: str) -> torch.Tensor:
        """One stored tensor in its file dtype, on the module's device (a view, never a copy)."""
        if name in self.streams:
            start, size = self.streams[name]
            return self.blob[start : start + size]
        return getattr(self, f"stored_{name}").view(self._stored_dtypes[name])

    def stored_names(self) -> list[str]:
        return [*self.streams, *self._stored_dtypes]

    def packed(self) -> PackedLinear:
        """The stored tensors in their file dtypes, on the module's device."""
        tensors = {name: self.stored(name) for name in self.stored_names()}
        return PackedLinear(self.layout, (self.out_features, self.in_features), self.meta, tensors, self.encoding)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features]."""
        return packers.dequantize(self.packed())

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (bias excluded), as stored in the checkpoint."""
        return sum(size for _, size in self.streams.values()) + sum(
            getattr(self, f"stored_{name}").nbytes for name in self._stored_dtypes
        )

    @property
    def resident_bytes(self) -> int:
        """Bytes this module holds for its weight: the stored tensors with the blob's alignment
        padding, plus whatever the backend keeps (a decoded copy, kernel index tables)."""
        own = self.blob.nbytes + sum(getattr(self, f"stored_{name}").nbytes for name in self._stored_dtypes)
        return own + sum(t.nbytes for t in self.cache_tensors())

    def cache_tensors(self) -> list[torch.Tensor]:
        """Tensors a backend keeps beside the stored ones (not buffers: never saved)."""
        found: list[torch.Tensor] = []
        decoded = self.__dict__.get("_decoded")
        if decoded is not None:
            found.append(decoded)
        kernel: Any = self.__dict__.get("_kernel")
        if kernel is not None:
            found += kernel.extra_tensors()
        return found

    def release_caches(self) -> None:
        self.__dict__.pop("_decoded", None)
        self.__dict__.pop("_kernel", None)

    def _apply(self, fn, recurse=True):
        # Moving or casting the module invalidates what backends derived from its tensors.
        self.release_caches()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BACKENDS[self.backend](self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layout={self.layout}, backend={self.backend}"
        )
