"""The `binary_residual` layout's room: definition, bits and codec (layout.py)."""

from llmquant.layouts.binary_residual.layout import BinaryResidualBits, BinaryResidualLayout, binary_residual_bits

__all__ = ["BinaryResidualBits", "BinaryResidualLayout", "binary_residual_bits"]
