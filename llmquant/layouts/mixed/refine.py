"""What the refinement engine learns in a `mixed` record (llmquant/core/refine.py), the group
widths fixed:

- groups of 2..8 bits, by `RefineConfig.codes`: `rederive` = per (row, group) clipping logits
  (OmniQuant LWC, as in `uniform`), the codes re-derived from the full-precision weight with a
  straight-through round, zeros integer; `keep` = the method's codes and zeros kept, the scale
  learned relative to the method's (scale = scale0 (1 + a), a starting at 0);
- 1-bit groups: alpha and mu per (row, group), the signs kept (alpha = alpha0 (1 + a),
  mu = mu0 + alpha0 m, a and m starting at 0)."""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.refine import ClippedGrid, RefineConfig, fp16_ste, relative, spread
from llmquant.layouts.base import FP16, expand_groups


class MixedLearnable:
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], weight: torch.Tensor, config: RefineConfig):
        self.meta = meta
        device = weight.device
        rows, cols = weight.shape
        gs = meta["group_size"]
        self.cols = cols
        self.group_bits = tensors["group_bits"].to(device)
        groups = self.group_bits.numel()
        self.one_bit_groups = self.group_bits == 1
        self.one_bit = expand_groups(self.one_bit_groups.unsqueeze(0), cols, gs).expand(rows, cols)
        self.codes = tensors["codes"].to(device)
        self.signs = self.codes.float() * 2 - 1
        self.alpha0 = tensors["scales"].to(device).float()  # 1-bit groups: alpha; the others: scale
        self.mu0 = tensors["zeros"].to(device).float()  # 1-bit groups: mu; the others: integer zero
        has_multi, has_one_bit = bool((~self.one_bit_groups).any()), bool(self.one_bit_groups.any())
        self.grid: ClippedGrid | None = None
        self.clip_params: list[torch.Tensor] = []
        self.scale_params: list[torch.Tensor] = []
        self.a = self.m = None
        if config.codes == "rederive" and has_multi:
            col_group = torch.arange(cols, device=device) // gs
            maxq = (2 ** self.group_bits.long() - 1).float()
            self.grid = ClippedGrid(weight, col_group, groups, maxq, False, config.clip_init, gs)
            self.clip_params = self.grid.params
        if has_one_bit or (config.codes == "keep" and has_multi):
            # a: relative offset of every learned scale (1-bit alpha; with `keep`, the others' scale too)
            self.a = torch.zeros(rows, groups, device=device, requires_grad=True)
            self.scale_params.append(self.a)
        if has_one_bit:
            self.m = torch.zeros(rows, groups, device=device, requires_grad=True)
            self.scale_params.append(self.m)

    def _spread(self, per_group: torch.Tensor) -> torch.Tensor:
        return spread(per_group, self.cols, self.meta["group_size"])

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (row, group): the scale (alpha of 1-bit groups) and zero (mu of 1-bit groups) as stored,
        the learned ones through their offsets."""
        scale = self.alpha0 if self.a is None else fp16_ste(relative(self.alpha0, self.a))
        zero = self.mu0 if self.m is None else torch.where(self.one_bit_groups, fp16_ste(self.mu0 + self.alpha0 * self.m), self.mu0)
        return scale, zero

    def _decode(self):
        scale, zero = self._scales()
        binary = self._spread(zero) + self._spread(scale) * self.signs
        if self.grid is None:  # codes kept (or no group of 2..8 bits)
            multi = self._spread(scale) * (self.codes.float() - self._spread(zero))
            return torch.where(self.one_bit, binary, multi), self.codes.float(), scale, zero
        multi, codes, grid_scale, grid_zero = self.grid.quantize()
        one = self.one_bit_groups.unsqueeze(0)
        weight = torch.where(self.one_bit, binary, multi)
        return weight, torch.where(self.one_bit, self.codes.float(), codes), torch.where(one, scale, grid_scale), torch.where(one, zero, grid_zero)

    def weight(self) -> torch.Tensor:
        return self._decode()[0]

    @torch.no_grad()
    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        _, codes, scales, zeros = self._decode()
        tensors = {
            "codes": codes.to(torch.uint8),
            "group_bits": self.group_bits,
            "scales": scales.to(FP16),
            "zeros": zeros.to(FP16),
        }
        return tensors, self.meta
