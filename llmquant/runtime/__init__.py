"""Inference-time modules for packed checkpoints (see docs/format.md)."""

from llmquant.runtime.qlinear import QuantizedLinear, available_backends, register_backend, set_backend

__all__ = ["QuantizedLinear", "available_backends", "register_backend", "set_backend"]
