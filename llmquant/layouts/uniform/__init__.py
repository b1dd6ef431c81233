"""The `uniform` layout's room: definition, bits and codec (layout.py)."""

from llmquant.layouts.uniform.layout import UniformLayout, uniform_bits

__all__ = ["UniformLayout", "uniform_bits"]
