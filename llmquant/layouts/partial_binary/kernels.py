"""Where the kernels find the tensors of the `partial_binary` layout (PB-LLM):

    W[n, k] = high_scale[n] * (code - high_zero[n])     where salient
    W[n, k] = mu[n, g] + alpha[n, g] * (2 sign - 1)      elsewhere

The kernel needs, for a position, whether it is salient, and where its salient code or its sign is
in their streams (each stored only where used, row-major). With the salient bitmap, the salient
entries before (n, k) are the salient entries before row n's current 128-column chunk (a table
made once: an int64 start per row and an int16 count per row and chunk, 1/8 bit per weight) plus
those before k inside the chunk (a prefix sum over the kernel's K tile, which is that chunk). A
checkpoint that stores the salient positions as CSR (the smaller index at low salient shares) is
switched to the bitmap encoding of the same weight on first use: for PB-LLM 10% the same size
within 1%, for 5% half a bit per weight more. The sign of a binarized entry is then its row-major
position minus the salient entries before it.
"""

from __future__ import annotations

import torch

from llmquant.layouts import bitpack
from llmquant.layouts.base import Reader
from llmquant.layouts.kernel_weights import KernelWeights, Tiles
from llmquant.layouts.partial_binary.layout import mask_from_csr

CHUNK = 128  # columns per salient-count entry; the kernel's K tile for this layout

# Tile shapes for the fused kernel: K tiles are the 128-column chunks, so the row tile is what
# shrinks: 16 rows, and 8 warps at prefill (164-168 registers at sm_90, no spills; 32 rows, or 4
# warps at prefill, spilled).
TILES = Tiles(decode=(16, 128, 4), prefill=(64, 16, 128, 8))


def to_bitmap(module) -> None:
    """Re-encode a CSR-indexed module with the salient bitmap (same weight, same other tensors)."""
    if module.encoding.get("index_format") == "bitmap":
        return
    index = ("salient_cols", "salient_row_ends")
    mask = mask_from_csr(Reader({name: module.stored(name) for name in index}), module.out_features, module.in_features)
    tensors = {name: module.stored(name) for name in module.stored_names() if name not in index}
    tensors["salient_mask"] = bitpack.pack_mask(mask)
    module.replace_stored(tensors, {"index_format": "bitmap"})


def salient_counts(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(row start [rows] int64: salient entries in the rows before, per chunk count [rows, chunks]
    int16/int32: salient entries of the row before the chunk)."""
    rows, cols = module.out_features, module.in_features
    mask = bitpack.unpack_mask(module.stored("salient_mask"), (rows, cols))
    chunks = -(-cols // CHUNK)
    per_chunk = torch.nn.functional.pad(mask, (0, chunks * CHUNK - cols)).view(rows, chunks, CHUNK).sum(-1)
    within_row = per_chunk.cumsum(1) - per_chunk
    per_row = per_chunk.sum(1)
    row_start = per_row.cumsum(0) - per_row
    dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
    device = module.blob.device
    return row_start.to(device, torch.int64), within_row.to(device, dtype).contiguous()


def prepare(module) -> KernelWeights:
    to_bitmap(module)
    row_start, chunk_counts = salient_counts(module)
    streams, meta = module.streams, module.meta
    group_size = meta["group_size"]
    weights = (
        module.blob.view(torch.int32),
        streams["salient_mask"][0] * 8,
        streams["signs"][0] * 8,
        streams["salient_codes"][0] * 8,
        streams["high_zeros"][0] * 8,
        module.stored("high_scales"),
        module.stored("alpha"),
        module.stored("mu"),
        row_start,
        chunk_counts,
        chunk_counts.shape[1],
        group_size,
        -(-module.in_features // group_size),
    )
    return KernelWeights(
        "partial_binary", weights, meta["high_bit"], module.out_features, module.in_features,
        extra=[row_start, chunk_counts], block_k=CHUNK, tiles=TILES,
    )  # fmt: skip
