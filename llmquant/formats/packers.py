"""A record's tensors <-> the tensors stored in a checkpoint, through the layout's own codec.

`PackedLinear` is the stored form of one quantized linear: its stored tensors plus the JSON
descriptor that says how to unpack them. The codec of each layout lives with the layout
(llmquant/layouts/<layout>/), found through the registry by the layout name every descriptor
carries, so a stored linear says how to unpack itself and a layout never knows which method made it.
What each codec stores, and at which width, is specified in docs/format.md; in short, every code,
sign and mask is bit-packed and only where it is used, float side parameters stay fp16, so the
stored bytes are what the layouts' storage bit figures count.

Unpacking validates everything it reads (names, dtypes, sizes, ranges) and raises ValueError, so a
damaged file is reported by the checkpoint reader instead of decoding into garbage; an element
that a layout never reads (a sign at a salient position, say) comes back as 0/False. `check` makes
the same checks without decoding (the checkpoint reader's, so loading never unpacks a linear).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from llmquant.layouts import LAYOUTS, REGISTRY, get_layout
from llmquant.layouts.base import Reader


@dataclass
class PackedLinear:
    """The stored form of one quantized linear: its stored tensors plus the JSON descriptor that says
    how to unpack them (layout, layout version, [rows, cols], the record's meta, the codec's choices)."""

    layout: str
    shape: tuple[int, int]
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    encoding: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def descriptor(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "layout_version": get_layout(self.layout).version,
            "shape": list(self.shape),
            "meta": self.meta,
            "encoding": self.encoding,
            "tensors": sorted(self.tensors),
        }

    @classmethod
    def from_descriptor(cls, descriptor: Any, tensors: dict[str, torch.Tensor]) -> "PackedLinear":
        """Checks the descriptor's structure (not the tensors: `unpack` does that)."""
        if not isinstance(descriptor, dict):
            raise ValueError("descriptor is not a JSON object")
        layout = descriptor.get("layout")
        if not isinstance(layout, str) or layout not in REGISTRY:
            raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
        version, supported = descriptor.get("layout_version"), REGISTRY[layout].version
        if version != supported:
            raise ValueError(f"layout {layout} version {version!r} is not supported (this llmquant reads {supported})")
        shape = descriptor.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
            raise ValueError(f"shape must be [rows, cols] of positive integers, got {shape!r}")
        meta, encoding = descriptor.get("meta"), descriptor.get("encoding")
        if not isinstance(meta, dict) or not isinstance(encoding, dict):
            raise ValueError("descriptor needs 'meta' and 'encoding' objects")
        names = descriptor.get("tensors")
        if not isinstance(names, list) or set(names) != set(tensors):
            raise ValueError(f"descriptor lists tensors {names!r} but the file holds {sorted(tensors)}")
        return cls(layout, (shape[0], shape[1]), meta, tensors, encoding)


def pack(layout: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> PackedLinear:
    """A record's tensors -> its stored form (tensors moved to CPU). Raises ValueError for a record
    that does not follow its layout's schema."""
    codec = get_layout(layout)
    rows, cols = codec.shape_of(tensors)
    codec.check_meta(meta)
    codec.check_tensors(tensors, meta, rows, cols)
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise ValueError(f"record meta is not JSON-serialisable: {exc}") from None
    stored, encoding = codec.pack(tensors, meta, rows, cols)
    # Copies: side parameters may be views of one method tensor, and safetensors refuses to write
    # tensors that share storage.
    stored = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in stored.items()}
    return PackedLinear(layout, (rows, cols), dict(meta), stored, encoding)


def check(packed: PackedLinear) -> None:
    """Raises ValueError for stored tensors `unpack` would refuse, without decoding the codes (the
    layout's `check_stored`): what the checkpoint reader runs on every linear it loads."""
    codec = get_layout(packed.layout)
    rows, cols = packed.shape
    codec.check_meta(packed.meta)
    reader = Reader(packed.tensors)
    codec.check_stored(reader, packed.meta, packed.encoding, rows, cols)
    reader.finish()


def unpack(packed: PackedLinear) -> dict[str, torch.Tensor]:
    """Stored form -> the record's tensors, on the stored tensors' device. Raises ValueError for
    stored tensors that do not match the descriptor."""
    codec = get_layout(packed.layout)
    rows, cols = packed.shape
    codec.check_meta(packed.meta)
    reader = Reader(packed.tensors)
    tensors = codec.unpack(reader, packed.meta, packed.encoding, rows, cols)
    reader.finish()
    codec.check_tensors(tensors, packed.meta, rows, cols)
    return tensors


def dequantize(packed: PackedLinear) -> torch.Tensor:
    """The float32 weight, by the layout's definition (`decode`)."""
    return get_layout(packed.layout).decode(unpack(packed), packed.meta)
