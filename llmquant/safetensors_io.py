"""A deterministic, streaming, atomic safetensors writer.

`safetensors.torch.save_file` is not byte-deterministic: the header's `__metadata__` is serialised
from a hash map whose order changes from process to process, so two identical runs wrote different
bytes whenever a file had more than one metadata key (llmquant's packed checkpoints have three).
It also builds a serialised copy of every tensor in memory before writing. This writer emits the
same file format (any safetensors reader loads it) with a canonical layout:

- header: `__metadata__` first with sorted keys, then the tensors in data order; compact JSON,
  padded with spaces to a multiple of 8 bytes (as safetensors does);
- data: tensors ordered by element size (largest first), then by name, so every tensor starts at a
  multiple of its element size, as in files written by safetensors itself;
- written to a temporary name next to the target, fsync'ed, then renamed into place.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from llmquant.output import fsync_dir

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (any device; moved to the CPU one at a time) with string `metadata`."""
    path = Path(path)
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian
        raise RuntimeError("llmquant writes safetensors on little-endian machines only")
    prepared: list[tuple[str, torch.Tensor]] = []
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        prepared.append((name, tensor))
    prepared.sort(key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {key: metadata[key] for key in sorted(metadata)}
    offset = 0
    for name, tensor in prepared:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)))
            handle.write(raw)
            for _, tensor in prepared:
                if tensor.numel():
                    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    handle.write(data.numpy().data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
