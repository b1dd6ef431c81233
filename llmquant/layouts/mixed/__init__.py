"""The `mixed` layout's room: definition, bits and codec (layout.py)."""

from llmquant.layouts.mixed.layout import MixedLayout, group_widths, mixed_bits

__all__ = ["MixedLayout", "group_widths", "mixed_bits"]
