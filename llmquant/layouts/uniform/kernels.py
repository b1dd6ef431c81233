"""Where the kernels find the tensors of the `uniform` layout: W[n, k] = scale[n, g] * (code[n, k] - zero[n, g]).

Reads the stored tensors as they are (no repack): the codes stream (row-major, `bits` per code),
the zero points (row-major over [rows, groups], `bits` each; absent when symmetric: 2^(bits-1)),
the fp16 scales, and g_idx (act-order) when present; g = k // group_size otherwise. Any width 1..8,
any group size (a partial last group, a group wider than the row), any shape.
"""

from __future__ import annotations

import torch

from llmquant.core.groups import ceil_div
from llmquant.layouts.kernel_weights import KernelWeights, Tiles

# Tile shapes for the fused kernel: 16 weights per thread at decode and prefill: 102 and 112
# registers at sm_90, no spills.
TILES = Tiles(decode=(32, 128, 8), prefill=(64, 64, 32, 4))


def prepare(module) -> KernelWeights:
    """`module`: a QuantizedLinear of this layout (its blob, streams and stored tensors)."""
    meta = module.meta
    bits, group_size, sym = meta["bits"], meta["group_size"], meta["sym"]
    scales = module.stored("scales")
    has_g_idx = "g_idx" in module.stored_names()
    weights = (
        module.blob.view(torch.int32),
        module.streams["codes"][0] * 8,
        scales,
        0 if sym else module.streams["zeros"][0] * 8,
        module.stored("g_idx") if has_g_idx else scales,  # never read without g_idx
        group_size,
        ceil_div(module.in_features, group_size),
    )
    spec = bits + 16 * int(sym) + 32 * int(has_g_idx)
    return KernelWeights("uniform", weights, spec, module.out_features, module.in_features, tiles=TILES)
