"""A linear prepared for the fused kernels (GPU: Triton, CPU: C), whatever its layout.

Each layout's `prepare` (llmquant/layouts/<layout>/kernels.py) says where the module's stored
tensors are and builds the few index tables its kernels need; both kernels read the same arguments,
in the same order: the GPU's device function as one tuple (layouts/<layout>/gpu.py), the CPU's C
row decoder as its pointers and integers in that order (layouts/<layout>/cpu.c).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KernelWeights:
    layout: str
    weights: tuple  # tensors (on the module's device) and integers, in the layout's order
    spec: int  # layout-specific compile-time constants, packed into one integer
    rows: int
    cols: int
    extra: list[torch.Tensor] = field(default_factory=list)  # tensors made for the kernels (index tables)
    block_k: int | None = None  # a K tile the layout's GPU dequant relies on (partial_binary: its chunk)

    def extra_tensors(self) -> list[torch.Tensor]:
        return self.extra
