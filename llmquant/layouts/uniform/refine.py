"""What the refinement engine learns in a `uniform` record (llmquant/core/refine.py): per (row,
group) clipping logits of the range (OmniQuant LWC); scales and zeros are recomputed from the
clipped range and the codes re-derived from the full-precision weight with a straight-through round."""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.refine import ClippedGrid, RefineConfig
from llmquant.layouts.base import FP16


class UniformLearnable:
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], weight: torch.Tensor, config: RefineConfig):
        self.meta = meta
        self.g_idx = tensors.get("g_idx")
        rows, cols = weight.shape
        groups = tensors["scales"].shape[1]
        if self.g_idx is not None:
            col_group = self.g_idx.to(weight.device).long()
        else:
            col_group = torch.arange(cols, device=weight.device) // meta["group_size"]
        maxq = torch.full((groups,), float(2 ** meta["bits"] - 1))
        size = None if self.g_idx is not None else meta["group_size"]
        self.grid = ClippedGrid(weight, col_group, groups, maxq, meta["sym"], config.clip_init, size)
        self.clip_params = self.grid.params
        self.scale_params: list[torch.Tensor] = []

    def weight(self) -> torch.Tensor:
        return self.grid.quantize()[0]

    @torch.no_grad()
    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        _, codes, scale, zero = self.grid.quantize()
        tensors = {"codes": codes.to(torch.uint8), "scales": scale.to(FP16), "zeros": zero.to(torch.uint8)}
        if self.g_idx is not None:
            tensors["g_idx"] = self.g_idx
        return tensors, self.meta
