"""Round-to-nearest binarization: w ~ alpha * sign(w), alpha = mean |w| per row (or per row and
column group), no calibration, no error feedback: the "RTN 1-bit" baseline of the 1-bit papers.

alpha = mean |w| is the L2-optimal scale for fixed signs (XNOR-Net); sign(0) := +1, as in every
binarizer here. The record uses the `mixed` layout with every group at 1 bit (W = mu + alpha *
(2 s - 1), mu = 0): it stores exactly a sign plane and one scale per (row, group), so its storage
figure is that of a plain 1-bit code, not BiLLM's flags and eight parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from llmquant.core.groups import ceil_div, check_group_size, effective_group_size
from llmquant.core.record import QuantizedRecord
from llmquant.layouts import make_record
from llmquant.methods.base import Method, MethodConfig, register
from llmquant.methods.binarize import binarize


class SignConfig(MethodConfig):
    name: Literal["sign"] = "sign"
    group_size: int = Field(-1, description="columns sharing one alpha; -1 = one alpha per output channel")

    @model_validator(mode="after")
    def _check(self) -> "SignConfig":
        check_group_size(self.group_size)
        return self


@register
class Sign(Method[SignConfig]):
    Config = SignConfig
    layouts = ("mixed",)
    needs_calibration = False

    def quantize(self, name, weight, hessian, observer=None) -> QuantizedRecord:
        cfg = self.config
        W = weight.float()
        rows, cols = W.shape
        group_size = effective_group_size(cfg.group_size, cols)
        groups = ceil_div(cols, group_size)
        alpha = group_alpha(W, group_size)
        tensors = {
            "codes": (W >= 0).to(torch.uint8),
            "group_bits": torch.ones(groups, dtype=torch.uint8, device=W.device),
            "scales": alpha.half(),
            "zeros": torch.zeros(rows, groups, dtype=torch.float16, device=W.device),
        }
        meta = {"group_size": group_size, "target_bits": 1}
        return make_record("mixed", tensors, meta, loss=0.0)


def group_alpha(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """mean |w| per (row, group of group_size columns); the last group may be narrower. (rows, groups)"""
    rows, cols = weight.shape
    pad = -cols % group_size
    grouped = F.pad(weight, (0, pad)).view(rows, -1, group_size)
    real = F.pad(torch.ones(cols, dtype=torch.bool, device=weight.device), (0, pad)).view(-1, group_size)
    return binarize(grouped, real, order=1, centred=False, fp16_params=True).alpha[0]
