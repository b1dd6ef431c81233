"""The layouts: how a quantized linear is stored, one room per layout, one table for all of them.

Every stored linear names its layout (the descriptor's `layout`, the record's `layout`), and
`REGISTRY` maps that name to the one object that knows everything about it: its tensors, its
meaning (`decode`), its bit figures and its codec (llmquant/layouts/base.py). Methods build their
records through `make_record`, the writer and the loader go through the same objects, so a layout
is described exactly once.

    uniform          RTN, GPTQ        layouts/uniform/
    mixed            SliM-LLM, sign   layouts/mixed/
    partial_binary   PB-LLM           layouts/partial_binary/
    binary_residual  BiLLM            layouts/binary_residual/
"""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.record import QuantizedRecord
from llmquant.layouts.base import Layout
from llmquant.layouts.binary_residual import BinaryResidualLayout
from llmquant.layouts.mixed import MixedLayout
from llmquant.layouts.partial_binary import PartialBinaryLayout
from llmquant.layouts.uniform import UniformLayout

REGISTRY: dict[str, Layout] = {
    layout.name: layout
    for layout in (UniformLayout(), MixedLayout(), PartialBinaryLayout(), BinaryResidualLayout())
}
LAYOUTS = tuple(REGISTRY)


def get_layout(name: str) -> Layout:
    """The layout called `name`; ValueError naming the known ones otherwise."""
    layout = REGISTRY.get(name) if isinstance(name, str) else None
    if layout is None:
        raise ValueError(f"unknown layout {name!r} (known: {', '.join(LAYOUTS)})")
    return layout


def decode(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """The float32 weight a record of layout `name` stands for (pure torch, any device)."""
    return get_layout(name).decode(tensors, meta)


def check_tensors(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], rows: int, cols: int) -> None:
    """Raises ValueError if the tensors do not match the layout's schema (names, dtypes, shapes)."""
    get_layout(name).check_tensors(tensors, meta, rows, cols)


def make_record(
    name: str,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    loss: float = 0.0,
    stats: dict[str, Any] | None = None,
    expected: torch.Tensor | None = None,
) -> QuantizedRecord:
    """The one way a method turns its codes and parameters into a record: decode them (the record's
    definition), check the result equals the values the method's error feedback used (`expected`,
    when the method has them in the record's column order; a decode that holds NaN/Inf is left to the
    runner's named numerical error), and ask the layout for its bit figures and their diagnostics
    (added to `stats`)."""
    layout = get_layout(name)
    decoded = layout.decode(tensors, meta)
    # A decode that is not finite (a side parameter beyond float16's range, say) is a numerical
    # failure, not a broken method: the runner reports it naming the linear (exit 3).
    finite = bool(torch.isfinite(decoded).all())
    if expected is not None and finite and not torch.equal(decoded, expected.to(decoded.device)):
        raise AssertionError(f"{name} record does not decode to the method's values")
    stats = {**(stats or {}), **layout.bit_stats(tensors, meta)}
    return QuantizedRecord(decoded, name, tensors, meta, layout.bit_figures(tensors, meta), loss, stats)


__all__ = ["LAYOUTS", "REGISTRY", "Layout", "check_tensors", "decode", "get_layout", "make_record"]
