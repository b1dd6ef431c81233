"""Round-to-nearest: the uniform grid of GPTQ without error feedback (the baseline every paper prints)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from llmquant.core.groups import check_group_size
from llmquant.core.record import QuantizedRecord
from llmquant.methods.base import Method, MethodConfig, register
from llmquant.methods.uniform_quantizer import UniformGroupQuantizer


class RTNConfig(MethodConfig):
    name: Literal["rtn"] = "rtn"
    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="columns per quantization group; -1 = per output channel")
    sym: bool = False

    @model_validator(mode="after")
    def _check(self) -> "RTNConfig":
        check_group_size(self.group_size)
        return self


@register
class RTN(Method[RTNConfig]):
    Config = RTNConfig
    layouts = ("uniform",)
    needs_calibration = False

    def quantize(self, name, weight, hessian, observer=None) -> QuantizedRecord:
        cfg = self.config
        W = weight.float()
        rows, cols = W.shape
        quantizer = UniformGroupQuantizer(rows, cols, cfg.bits, cfg.group_size, cfg.sym, W.device)
        quantizer.quantize_block(0, cols, W)  # fills the quantizer's codes and parameters
        # No error feedback, so no OBS loss (and no data: the report has no output-error figure).
        return quantizer.record(loss=0.0)
