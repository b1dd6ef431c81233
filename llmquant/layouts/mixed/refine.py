"""What the refinement engine learns in a `mixed` record (llmquant/core/refine.py), the group
widths fixed:

- groups of 2..8 bits: per (row, group) clipping logits (OmniQuant LWC, as in `uniform`), the codes
  re-derived from the full-precision weight with a straight-through round, zeros integer;
- 1-bit groups: alpha and mu per (row, group), the signs kept (alpha = alpha0 (1 + a),
  mu = mu0 + alpha0 m, a and m starting at 0)."""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.refine import ClippedGrid, RefineConfig, fp16_ste, relative
from llmquant.layouts.base import FP16, expand_groups


class MixedLearnable:
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], weight: torch.Tensor, config: RefineConfig):
        self.meta = meta
        device = weight.device
        rows, cols = weight.shape
        gs = meta["group_size"]
        self.group_bits = tensors["group_bits"].to(device)
        groups = self.group_bits.numel()
        self.one_bit_groups = self.group_bits == 1
        self.one_bit = expand_groups(self.one_bit_groups.unsqueeze(0), cols, gs).expand(rows, cols)
        col_group = torch.arange(cols, device=device) // gs
        maxq = (2 ** self.group_bits.long() - 1).float()
        self.grid = ClippedGrid(weight, col_group, groups, maxq, False, config.clip_init, gs)
        self.col_group = col_group
        self.codes = tensors["codes"].to(device)
        self.signs = self.codes.float() * 2 - 1
        self.alpha0 = tensors["scales"].to(device).float()
        self.mu0 = tensors["zeros"].to(device).float()
        self.clip_params = self.grid.params if bool((~self.one_bit_groups).any()) else []
        self.scale_params = []
        if bool(self.one_bit_groups.any()):
            self.a = torch.zeros(rows, groups, device=device, requires_grad=True)
            self.m = torch.zeros(rows, groups, device=device, requires_grad=True)
            self.scale_params = [self.a, self.m]

    def _binary(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.scale_params:
            return self.alpha0, self.mu0
        return fp16_ste(relative(self.alpha0, self.a)), fp16_ste(self.mu0 + self.alpha0 * self.m)

    def _decode(self):
        multi, codes, scale, zero = self.grid.quantize()
        alpha, mu = self._binary()
        binary = self.grid.spread(mu) + self.grid.spread(alpha) * self.signs
        weight = torch.where(self.one_bit, binary, multi)
        one = self.one_bit_groups.unsqueeze(0)
        return weight, torch.where(self.one_bit, self.codes.float(), codes), torch.where(one, alpha, scale), torch.where(one, mu, zero)

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
