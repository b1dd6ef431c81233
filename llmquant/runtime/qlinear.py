"""QuantizedLinear: a linear layer that holds its packed tensors and dequantizes them on the fly.

The module keeps exactly what the checkpoint stores for the linear (docs/format.md), as buffers
named after the stored tensors, so a packed model occupies packed size in memory.

Backends are the seam for faster kernels: a backend is a function (module, x) -> y registered
under a name; `module.backend` picks one per module (`set_backend` sets it for a whole model).
"torch" is the pure-torch reference every other backend must agree with: every forward unpacks and
decodes the weight with the layout's own `decode` (the record's definition), casts it to the
activations' dtype and multiplies, caching nothing (packed memory). "torch-cached" keeps the
decoded weight after the first forward: the same numbers at the memory of an unpacked model.

Floating-point stored tensors (the fp16 scales and means) are held as integer views of their bits,
because `model.half()` / `model.to(dtype)` convert every floating-point buffer and would silently
round them; `packed()` views them back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.formats import packers
from llmquant.formats.packers import PackedLinear

Backend = Callable[["QuantizedLinear", torch.Tensor], torch.Tensor]

# Same-width integer containers for floating-point stored tensors (see the module docstring).
_BIT_VIEWS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


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


_BACKENDS: dict[str, Backend] = {"torch": torch_backend, "torch-cached": cached_torch_backend}


def register_backend(name: str, backend: Backend) -> None:
    """Add a forward implementation (e.g. a GPU dequant-matmul kernel) under `name`."""
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is already registered")
    _BACKENDS[name] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def _check_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")


def set_backend(model: nn.Module, name: str) -> int:
    """Use backend `name` for every QuantizedLinear in `model`; returns how many modules it set."""
    _check_backend(name)
    modules = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for module in modules:
        module.backend = name
    return len(modules)


class QuantizedLinear(nn.Module):
    """Drop-in replacement for nn.Linear built from a linear's stored form (`PackedLinear`)."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None = None, backend: str = "torch"):
        super().__init__()
        _check_backend(backend)
        self.out_features, self.in_features = packed.shape
        self.layout = packed.layout
        self.meta = dict(packed.meta)
        self.encoding = dict(packed.encoding)
        self.backend = backend
        self._stored_dtypes = {name: t.dtype for name, t in packed.tensors.items()}
        for name, tensor in packed.tensors.items():
            view = _BIT_VIEWS.get(tensor.dtype)
            self.register_buffer(name, tensor.view(view) if view is not None else tensor)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit {self.out_features} outputs")
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def packed(self) -> PackedLinear:
        """The stored tensors in their file dtypes, on the module's device."""
        tensors = {name: getattr(self, name).view(dtype) for name, dtype in self._stored_dtypes.items()}
        return PackedLinear(self.layout, (self.out_features, self.in_features), self.meta, tensors, self.encoding)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features]."""
        return packers.dequantize(self.packed())

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (bias excluded), as stored in the checkpoint."""
        return sum(getattr(self, name).nbytes for name in self._stored_dtypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BACKENDS[self.backend](self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layout={self.layout}, backend={self.backend}"
        )
