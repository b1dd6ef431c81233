"""What the refinement engine learns in a `uniform` record (llmquant/core/refine.py), by
`RefineConfig.codes`:

- `rederive` (OmniQuant LWC): per (row, group) clipping logits of the range; scales and zeros are
  recomputed from the clipped range and the codes re-derived from the full-precision weight with a
  straight-through round;
- `keep`: the method's codes and zeros (GPTQ's error-compensated choice) stay; each (row, group)'s
  scale is learned as an offset relative to the method's (scale = scale0 (1 + a), a starting at 0),
  so refinement starts at the record itself."""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.refine import ClippedGrid, RefineConfig, fp16_ste, relative, spread_to_columns
from llmquant.layouts.base import FP16


class UniformLearnable:
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], weight: torch.Tensor, config: RefineConfig):
        self.meta = meta
        self.g_idx = tensors.get("g_idx")
        rows, cols = weight.shape
        groups = tensors["scales"].shape[1]
        if self.g_idx is not None:
            self.col_group = self.g_idx.to(weight.device).long()
        else:
            self.col_group = torch.arange(cols, device=weight.device) // meta["group_size"]
        self.group_size = None if self.g_idx is not None else meta["group_size"]  # None: act-order's g_idx
        self.grid: ClippedGrid | None = None
        self.clip_params: list[torch.Tensor] = []
        self.scale_params: list[torch.Tensor] = []
        if config.codes == "keep":
            self.codes = tensors["codes"].to(weight.device)
            self.zeros = tensors["zeros"].to(weight.device)
            self.scale0 = tensors["scales"].to(weight.device).float()
            self.a = torch.zeros_like(self.scale0, requires_grad=True)
            self.scale_params = [self.a]
        else:
            maxq = torch.full((groups,), float(2 ** meta["bits"] - 1))
            self.grid = ClippedGrid(weight, self.col_group, groups, maxq, meta["sym"], config.clip_init, self.group_size)
            self.clip_params = self.grid.params

    def _spread(self, per_group: torch.Tensor) -> torch.Tensor:
        return spread_to_columns(per_group, self.col_group, self.group_size)

    def _kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dequantized weight, scale) with the codes and zeros kept."""
        scale = fp16_ste(relative(self.scale0, self.a))
        return self._spread(scale) * (self.codes.float() - self._spread(self.zeros.float())), scale

    def weight(self) -> torch.Tensor:
        if self.grid is None:
            return self._kept()[0]
        return self.grid.quantize()[0]

    @torch.no_grad()
    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.grid is None:
            tensors = {"codes": self.codes, "scales": self._kept()[1].to(FP16), "zeros": self.zeros}
        else:
            _, codes, scale, zero = self.grid.quantize()
            tensors = {"codes": codes.to(torch.uint8), "scales": scale.to(FP16), "zeros": zero.to(torch.uint8)}
        if self.g_idx is not None:
            tensors["g_idx"] = self.g_idx
        return tensors, self.meta
