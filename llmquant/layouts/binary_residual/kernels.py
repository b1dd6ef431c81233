"""Where the kernels find the tensors of the `binary_residual` layout (BiLLM): a 2-bit code per weight decoded
through 8 parameters per (row, block).

    salient column:  W = a1 (2 s - 1) + m1 + a2 (2 s2 - 1) + m2
    otherwise:       W = sa (2 s - 1) + sm  if sparse  else  ca (2 s - 1) + cm

The stored tensors are read as they are: the first sign plane (every weight), the second plane
(salient columns only, row-major) and the sparse flag (other columns only, row-major), the column
bitmap and the fp16 parameters. Where a column's second-plane bit or flag is in its row follows
from how many salient columns come before it: one int32 per column, made once.
"""

from __future__ import annotations

import torch

from llmquant.layouts import bitpack
from llmquant.layouts.kernel_weights import KernelWeights, Tiles

# Tile shapes for the fused kernel: three bit streams and a block-parameter gather per weight:
# 16-row decode tiles, 32x32 prefill tiles (247 / 226 registers at sm_90, no spills).
TILES = Tiles(decode=(16, 128, 4), prefill=(64, 32, 32, 4))


def prepare(module) -> KernelWeights:
    cols = module.in_features
    columns = bitpack.unpack_mask(module.stored("salient_columns"), (cols,)).long()
    salient_before = (columns.cumsum(0) - columns).to(module.blob.device, torch.int32)
    streams = module.streams
    blocksize = module.meta["blocksize"]
    weights = (
        module.blob.view(torch.int32),
        streams["salient_columns"][0] * 8,
        streams["signs"][0] * 8,
        streams["signs2"][0] * 8,
        streams["sparse_mask"][0] * 8,
        salient_before,
        int(columns.sum()),
        module.stored("params"),
        blocksize,
        -(-cols // blocksize),
    )
    return KernelWeights(
        "binary_residual", weights, 0, module.out_features, cols, extra=[salient_before], tiles=TILES
    )
