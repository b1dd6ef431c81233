"""Running quantized models: the QuantizedLinear module with its backends, and the loader that
builds a runnable model from a packed checkpoint (see docs/format.md)."""

from llmquant.runtime.loader import load_model, load_quantized
from llmquant.runtime.qlinear import QuantizedLinear, available_backends, register_backend, set_backend

__all__ = ["QuantizedLinear", "available_backends", "load_model", "load_quantized", "register_backend", "set_backend"]
