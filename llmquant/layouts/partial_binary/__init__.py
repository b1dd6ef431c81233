"""The `partial_binary` layout's room: definition, bits and codec (layout.py)."""

from llmquant.layouts.partial_binary.layout import (
    PartialBinaryBits,
    PartialBinaryLayout,
    csr_index_bits,
    partial_binary_bits,
)

__all__ = ["PartialBinaryBits", "PartialBinaryLayout", "csr_index_bits", "partial_binary_bits"]
