"""The contract between a method backend and the rest of llmquant.

A backend receives a weight and its Hessian and returns a `QuantizedRecord`: the dequantized weight
(what a fake-quant checkpoint stores), plus the codes and parameters it chose (what the packed
writer stores), plus the three bit figures. Nothing else crosses the boundary.

Each layout's tensors, meaning and bit figures live in `llmquant/layouts/` (and docs/format.md); the
layout name is the only thing the packed writer looks at, so a layout never needs to know which
method made it. Methods build records with `layouts.make_record`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class BitFigures:
    """Bits per weight of one quantized linear, three ways (see docs/bits.md).

    paper:   the convention the method's paper prints (e.g. BiLLM's N_param, PB-LLM's 0.9*1+0.1*8).
    code:    bits of the weight codes actually chosen, including per-element flags/masks the codes
             cannot be decoded without (BiLLM's split flag, PB-LLM's salient bitmap), excluding
             floating-point side parameters.
    storage: everything written per quantized weight: codes + masks + scales/zeros/means, i.e. the
             packed tensors' bytes * 8 / parameter count.
    """

    paper: float
    code: float
    storage: float

    def as_dict(self) -> dict[str, float]:
        return {"paper": self.paper, "code": self.code, "storage": self.storage}


@dataclass
class QuantizedRecord:
    """What a method returns for one linear layer.

    dequantized: float tensor of the weight's shape; exactly what the packed layout decodes to.
    layout:      name of the packed layout ("uniform", "mixed", "partial_binary", "binary_residual").
    tensors:     the layout's codes and parameters (names/shapes per docs/format.md), on CPU or the
                 compute device; the writer moves them.
    meta:        JSON-serialisable layout parameters (bits, group_size, ...).
    bits:        the three bit figures for this linear.
    loss:        the method's own error measure: sum over elements of (w - q)^2 / U_jj^2 / 2, the
                 GPTQ/OBS loss (comparable across methods that use the same Hessian).
    stats:       JSON-serialisable diagnostics for the report (salient columns, chosen bits, ...).
    """

    dequantized: torch.Tensor
    layout: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    bits: BitFigures
    loss: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.dequantized.numel()


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
