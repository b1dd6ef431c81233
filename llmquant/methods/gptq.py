"""GPTQ (Frantar et al., 2022): uniform group quantization with OBS error feedback."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from llmquant.core.gptq import gptq_loop
from llmquant.core.groups import check_group_size
from llmquant.core.hessian import fix_dead_columns, inverse_cholesky_upper
from llmquant.core.record import QuantizedRecord
from llmquant.methods.base import HessianMethodConfig, Method, register
from llmquant.methods.uniform_quantizer import UniformGroupQuantizer


class GPTQConfig(HessianMethodConfig):
    name: Literal["gptq"] = "gptq"
    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="columns per quantization group; -1 = per output channel")
    sym: bool = False
    act_order: bool = Field(False, description="process columns by descending diag(H)")
    static_groups: bool = Field(False, description="with act_order: fit groups up front in natural order")

    @model_validator(mode="after")
    def _check(self) -> "GPTQConfig":
        check_group_size(self.group_size)
        return self


@register
class GPTQ(Method[GPTQConfig]):
    Config = GPTQConfig
    layouts = ("uniform",)

    def quantize(self, name, weight, hessian, observer=None) -> QuantizedRecord:
        cfg = self.config
        W, H = (weight, hessian) if weight.dtype == torch.float64 else (weight.float(), hessian)
        fix_dead_columns(W, H)
        rows, cols = W.shape
        perm = None
        if cfg.act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            H = H[perm][:, perm]
        upper, _ = inverse_cholesky_upper(H, cfg.percdamp, name=name)
        quantizer = UniformGroupQuantizer(
            rows, cols, cfg.bits, cfg.group_size, cfg.sym, W.device,
            perm=perm.cpu() if perm is not None else None,
            static_source=W if cfg.static_groups else None,
            dtype=W.dtype,
        )
        result = gptq_loop(W[:, perm] if perm is not None else W, upper, quantizer, cfg.blocksize)
        return quantizer.record(result.loss)
