"""A linear prepared for the fused kernels (GPU: Triton, CPU: C), whatever its layout.

Each layout's `prepare` (llmquant/layouts/<layout>/kernels.py) says where the module's stored
tensors are and builds the few index tables its kernels need; both kernels read the same arguments,
in the same order: the GPU's device function as one tuple (layouts/<layout>/gpu.py), the CPU's C
row decoder as its pointers and integers in that order (layouts/<layout>/cpu.c).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tiles:
    """A layout's tile shapes for the fused Triton kernel (llmquant/layouts/kernel_base.py):
    decode (at most 16 tokens; BLOCK_M is 16) as (BLOCK_N, BLOCK_K, num_warps), prefill as
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps).

    Each layout picks its own, because the cost is the dequantization: every weight of the tile is
    computed in registers from bit offsets, table lookups and its group's scale, and a layout's
    heavier dequant needs a smaller tile per thread. The shapes are the largest with which ptxas keeps
    everything in registers at sm_90 (no spill stack; tests/test_kernel_resources.py compiles each
    layout for that target on a CPU and checks). The earlier tiles, shared by all layouts, spilled
    up to 15 KB per thread or did not fit in shared memory at all (H200, docs/results-kernels.md)."""

    decode: tuple[int, int, int] = (32, 128, 8)
    prefill: tuple[int, int, int, int] = (64, 64, 32, 4)


@dataclass
class KernelWeights:
    layout: str
    weights: tuple  # tensors (on the module's device) and integers, in the layout's order
    spec: int  # layout-specific compile-time constants, packed into one integer
    rows: int
    cols: int
    extra: list[torch.Tensor] = field(default_factory=list)  # tensors made for the kernels (index tables)
    block_k: int | None = None  # a K tile the layout's GPU dequant relies on (partial_binary: its chunk)
    tiles: Tiles = field(default_factory=Tiles)  # the layout's tile shapes (launch_config)

    def extra_tensors(self) -> list[torch.Tensor]:
        return self.extra
