"""What the refinement engine learns in a `binary_residual` record (llmquant/core/refine.py): the
alpha and mu of each (row, block) for each part, i.e. both orders of the salient columns, the
concentrated and the sparse group (alpha = alpha0 (1 + a), mu = mu0 + alpha0 m, a and m starting at
0); the salient columns, the split mask and both sign planes stay frozen."""

from __future__ import annotations

from typing import Any

import torch

from llmquant.core.refine import RefineConfig, fp16_ste, spread
from llmquant.layouts.base import FP16, signs_of
from llmquant.layouts.binary_residual.layout import PARAMS_PER_ROW_BLOCK


class BinaryResidualLearnable:
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], weight: torch.Tensor, config: RefineConfig):
        device = weight.device
        self.meta = meta
        self.tensors = {k: v.to(device) for k, v in tensors.items()}
        t = self.tensors
        rows, cols = t["signs"].shape
        self.p0 = t["params"].float()  # [rows, blocks, 8]: (alpha, mu) x (salient 1, salient 2, concentrated, sparse)
        alpha0 = self.p0[:, :, 0::2]
        # each slot's reference scale: its pair's alpha (an alpha moves relative to itself, a mu in units of it)
        self.unit = alpha0.repeat_interleave(2, dim=2)
        self.offset = torch.zeros_like(self.p0, requires_grad=True)
        self.s1, self.s2 = signs_of(t["signs"]), signs_of(t["signs2"])
        self.salient = t["salient_columns"].unsqueeze(0).expand(rows, cols)
        self.cols = cols
        self.clip_params: list[torch.Tensor] = []
        self.scale_params = [self.offset]

    def _params(self) -> torch.Tensor:
        return fp16_ste(self.p0 + self.unit * self.offset)

    def weight(self) -> torch.Tensor:
        p = self._params()
        bs = self.meta["blocksize"]
        a1, m1, a2, m2, ca, cm, sa, sm = (spread(p[:, :, k], self.cols, bs) for k in range(PARAMS_PER_ROW_BLOCK))
        sal = a1 * self.s1 + m1 + a2 * self.s2 + m2
        rest = torch.where(self.tensors["sparse_mask"], sa * self.s1 + sm, ca * self.s1 + cm)
        return torch.where(self.salient, sal, rest)

    @torch.no_grad()
    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {**self.tensors, "params": self._params().to(FP16)}, self.meta
