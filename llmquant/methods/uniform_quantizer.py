"""The uniform group quantizer as a GPTQ column quantizer; shared by the RTN and GPTQ methods."""

from __future__ import annotations

import torch

from llmquant.core.gptq import ColumnQuantizer, CurrentColumns
from llmquant.core.groups import ceil_div, effective_group_size
from llmquant.core.record import QuantizedRecord
from llmquant.core.uniform import dequantize_codes, minmax_params, quantize_codes
from llmquant.layouts import make_record


class UniformGroupQuantizer(ColumnQuantizer):
    """Per-(row, group) min-max grid; group parameters are fitted when the loop reaches a group's
    first column, from the current (error-compensated) values of the group's columns.

    perm: loop position -> original column (act-order); None for natural order.
    static_groups: fit every group once, up front, from `static_source` (the unpermuted weight), so
    that group membership stays contiguous in the original column order (GPTQ's --static-groups).
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        bits: int,
        group_size: int,
        sym: bool,
        device: torch.device,
        perm: torch.Tensor | None = None,
        static_source: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.bits, self.sym, self.cols = bits, sym, cols
        self.group_size = effective_group_size(group_size, cols)
        self.groups = ceil_div(cols, self.group_size)
        self.perm = perm
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(rows, self.groups, dtype=dtype, device=device)
        self.zeros = torch.zeros(rows, self.groups, dtype=dtype, device=device)
        original = perm.tolist() if perm is not None else range(cols)
        self.static = static_source is not None
        if self.static:
            # Group of a loop position = group of its original column.
            self.group_of = [c // self.group_size for c in original]
            for g in range(self.groups):
                cols_g = static_source[:, g * self.group_size : (g + 1) * self.group_size]
                self._fit(g, cols_g)
        else:
            # Group of a loop position = its position // group_size (act-order groups follow the loop).
            self.group_of = [j // self.group_size for j in range(cols)]
        self.g_idx = torch.empty(cols, dtype=torch.int32)
        for j, c in enumerate(original):
            self.g_idx[c] = self.group_of[j]

    def _fit(self, group: int, values: torch.Tensor) -> None:
        scale, zero = minmax_params(values, self.bits, self.sym)
        # Round the scale to its storage precision now, so the error feedback sees what is stored.
        self.scales[:, group] = scale.half().to(self.scales.dtype)
        self.zeros[:, group] = zero

    def quantize_column(self, index: int, column: torch.Tensor, current: CurrentColumns) -> torch.Tensor:
        g = self.group_of[index]
        if not self.static and index % self.group_size == 0:
            end = min(index + self.group_size, self.cols)
            self._fit(g, current(index, end))
        scale, zero = self.scales[:, g], self.zeros[:, g]
        codes = quantize_codes(column, scale, zero, self.bits)
        original = self.perm[index].item() if self.perm is not None else index
        self.codes[:, original] = codes.to(torch.uint8)
        return dequantize_codes(codes, scale, zero)

    def record(self, loss: float) -> QuantizedRecord:
        natural = torch.equal(self.g_idx, torch.arange(self.cols, dtype=torch.int32) // self.group_size)
        tensors = {"codes": self.codes, "scales": self.scales.half(), "zeros": self.zeros.to(torch.uint8)}
        if not natural:
            tensors["g_idx"] = self.g_idx
        meta = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        # Decoding is the definition of the record; with the fp16-rounded scales it reproduces the
        # loop's float32 values exactly (tests/test_gptq.py checks this).
        return make_record("uniform", tensors, meta, loss)
