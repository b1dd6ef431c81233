"""What the refinement engine learns in a `partial_binary` record (llmquant/core/refine.py): alpha
and mu of the binarized part per (row, group) (alpha = alpha0 (1 + a), mu = mu0 + alpha0 m, a and m
starting at 0); the salient mask, the 8-bit salient weights and the signs stay frozen."""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.refine import RefineConfig, fp16_ste, relative, spread
from llmquant.layouts.base import FP16, signs_of


class PartialBinaryLearnable:
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], weight: torch.Tensor, config: RefineConfig):
        device = weight.device
        self.meta = meta
        self.tensors = {k: v.to(device) for k, v in tensors.items()}
        t = self.tensors
        self.cols = t["salient_mask"].shape[1]
        self.high = t["high_scales"].float().unsqueeze(1) * (t["salient_codes"].float() - t["high_zeros"].float().unsqueeze(1))
        self.signs = signs_of(t["signs"])
        self.alpha0, self.mu0 = t["alpha"].float(), t["mu"].float()
        self.a = torch.zeros_like(self.alpha0, requires_grad=True)
        self.m = torch.zeros_like(self.mu0, requires_grad=True)
        self.clip_params: list[torch.Tensor] = []
        self.scale_params = [self.a, self.m]

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fp16_ste(relative(self.alpha0, self.a)), fp16_ste(self.mu0 + self.alpha0 * self.m)

    def weight(self) -> torch.Tensor:
        alpha, mu = self._params()
        gs = self.meta["group_size"]
        binary = spread(mu, self.cols, gs) + spread(alpha, self.cols, gs) * self.signs
        return torch.where(self.tensors["salient_mask"], self.high, binary)

    @torch.no_grad()
    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        alpha, mu = self._params()
        return {**self.tensors, "alpha": alpha.to(FP16), "mu": mu.to(FP16)}, self.meta
