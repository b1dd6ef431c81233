"""The one place that computes bit figures (see BitFigures in record.py and docs/bits.md).

One module per layout (uniform, mixed, partial_binary, binary_residual); this package's root holds
what they share.

Storage figures count every tensor the packed layout writes for a linear, at the widths the format
stores them (docs/format.md): fp16 scales/means, integer zero points at the code width, bitmaps at 1
bit per element, index lists at their integer width. `tests/test_format*.py` checks that the packed
bytes agree with these formulas.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmquant.core.record import BitFigures

FP16_BITS = 16


def combine(figures: Iterable[tuple[BitFigures, int]]) -> BitFigures:
    """Parameter-weighted mean of per-linear figures: [(figures, numel), ...]."""
    total = paper = code = storage = 0.0
    for fig, n in figures:
        total += n
        paper += fig.paper * n
        code += fig.code * n
        storage += fig.storage * n
    if total == 0:
        return BitFigures(0.0, 0.0, 0.0)
    return BitFigures(paper / total, code / total, storage / total)
