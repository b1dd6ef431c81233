"""The layouts' side of the refinement engine (llmquant/core/refine.py): which layout learns what.

Each layout's room has a `refine.py` whose learnable takes a record's tensors and meta plus the
linear's full-precision weight, decodes differentiably, and exports tensors of its layout; this
table turns them into the engine's `Learnable` (export -> a record made by `make_record`, i.e.
decoded by the layout itself and with its bit figures, so a refined record is an exact record of
its layout).

    uniform          clipping logits per (row, group), codes re-derived (straight-through round);
                     with `codes: keep`, the scales per (row, group), codes and zeros kept
    mixed            2..8-bit groups as uniform; alpha/mu of 1-bit groups
    partial_binary   alpha/mu of the binarized part; salient 8-bit weights and signs frozen
    binary_residual  alpha/mu of each part (salient orders 1 and 2, concentrated, sparse) per block
"""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.record import QuantizedRecord
from llmquant.core.refine import RefineConfig
from llmquant.layouts import make_record
from llmquant.layouts.binary_residual.refine import BinaryResidualLearnable
from llmquant.layouts.mixed.refine import MixedLearnable
from llmquant.layouts.partial_binary.refine import PartialBinaryLearnable
from llmquant.layouts.uniform.refine import UniformLearnable

LEARNABLES: dict[str, Any] = {
    "uniform": UniformLearnable,
    "mixed": MixedLearnable,
    "partial_binary": PartialBinaryLearnable,
    "binary_residual": BinaryResidualLearnable,
}


class RecordLearnable:
    """A layout's learnable, exporting full records (what the engine installs and the writer stores)."""

    def __init__(self, record: QuantizedRecord, inner: Any):
        self.record = record
        self.inner = inner
        self.clip_params = inner.clip_params
        self.scale_params = inner.scale_params

    def weight(self) -> torch.Tensor:
        return self.inner.weight()

    def export(self) -> QuantizedRecord:
        tensors, meta = self.inner.export()
        tensors = {k: v.cpu() for k, v in tensors.items()}
        return make_record(self.record.layout, tensors, dict(meta), self.record.loss, dict(self.record.stats))


def learnable(record: QuantizedRecord, weight: torch.Tensor, config: RefineConfig) -> RecordLearnable | None:
    """The engine's LearnableFactory: None for a layout with nothing to learn."""
    cls = LEARNABLES.get(record.layout)
    if cls is None:
        return None
    device = weight.device
    tensors = {k: v.to(device) for k, v in record.tensors.items()}
    inner = cls(tensors, record.meta, weight, config)
    if not inner.clip_params and not inner.scale_params:
        return None
    return RecordLearnable(record, inner)
