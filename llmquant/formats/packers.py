"""One codec per record layout: a record's tensors <-> the tensors stored in a checkpoint.

The codecs are a table keyed by the layout name that every checkpoint entry carries (`CODECS`), so
a stored linear says how to unpack itself and a layout never knows which method produced it.
What each codec stores, and at which width, is specified in docs/format.md; in short, every code,
sign and mask is bit-packed (`bitpack`) and only where it is used, float side parameters stay fp16,
so the stored bytes are what `llmquant.core.bits` counts.

Unpacking validates everything it reads (names, dtypes, sizes, ranges) and raises ValueError, so a
damaged file is reported by the checkpoint reader instead of decoding into garbage; an element
that a layout never reads (a sign at a salient position, say) comes back as 0/False.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from llmquant.core.bits.partial_binary import csr_index_bits
from llmquant.core.layouts import check_tensors, decode
from llmquant.formats import bitpack

LAYOUT_VERSION = 1
FP16 = torch.float16


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _group_columns(per_group: torch.Tensor, cols: int, size: int) -> torch.Tensor:
    """[groups] -> [cols]: the value of each column's group."""
    return per_group.repeat_interleave(size)[:cols]


_SIZE_LIMIT = 2**31 - 1

# The meta keys each codec reads: an inclusive integer range, or bool. Checked before packing and
# before unpacking, so a record the reader would refuse is never written.
_META_SPECS: dict[str, dict[str, tuple[int, int] | type]] = {
    "uniform": {"bits": (1, 8), "group_size": (1, _SIZE_LIMIT), "sym": bool},
    "mixed": {"group_size": (1, _SIZE_LIMIT)},
    "partial_binary": {"high_bit": (1, 8), "group_size": (1, _SIZE_LIMIT)},
    "binary_residual": {"blocksize": (1, _SIZE_LIMIT)},
}


def _check_meta(layout: str, meta: dict[str, Any]) -> None:
    for key, spec in _META_SPECS[layout].items():
        value = meta.get(key)
        if spec is bool:
            if not isinstance(value, bool):
                raise ValueError(f"meta[{key!r}] must be true or false, got {value!r}")
        elif type(value) is not int or not spec[0] <= value <= spec[1]:
            raise ValueError(f"meta[{key!r}] must be an integer in [{spec[0]}, {spec[1]}], got {value!r}")


def _integral(values: torch.Tensor, what: str) -> torch.Tensor:
    """Float tensor holding integers (fp16 zero points) -> int64, refusing anything else."""
    as_float = values.float()
    if not bool(torch.isfinite(as_float).all()) or not torch.equal(as_float, as_float.round()):
        raise ValueError(f"{what} must hold integers")
    return as_float.to(torch.int64)


def _check_group_bits(group_bits: torch.Tensor) -> None:
    if bool(((group_bits < 1) | (group_bits > 8)).any()):
        raise ValueError("group_bits must lie in 1..8")


def _csr_index_bits(cols: int) -> int:
    """Bits of one column index: ceil(log2(cols)), at least 1."""
    return max(1, (cols - 1).bit_length())


class _Reader:
    """Hands out a linear's stored tensors by name, checking each is present, of the right dtype
    and size, and that nothing is left over at the end."""

    def __init__(self, stored: dict[str, torch.Tensor]):
        self._stored = stored
        self._unused = set(stored)
        self.device = next(iter(stored.values())).device if stored else torch.device("cpu")

    def has(self, name: str) -> bool:
        return name in self._stored

    def raw(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._stored:
            raise ValueError(f"missing stored tensor {name!r}")
        self._unused.discard(name)
        tensor = self._stored[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"stored tensor {name!r} should be {dtype} {shape}, found {tensor.dtype} {tuple(tensor.shape)}"
            )
        return tensor

    def bits(self, name: str, width: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A field packed at `width` bits for every element of `shape`."""
        count = 1
        for size in shape:
            count *= size
        packed = self.raw(name, torch.uint8, (bitpack.packed_nbytes(count, width),))
        return bitpack.unpack(packed, width, count).reshape(shape)

    def bits_at(self, name: str, width: int, where: torch.Tensor) -> torch.Tensor:
        """A field packed at `width` bits only where `where` is True; 0 elsewhere."""
        out = torch.zeros(where.shape, dtype=torch.uint8, device=self.device)
        out[where] = self.bits(name, width, (int(where.sum()),))
        return out

    def finish(self) -> None:
        if self._unused:
            raise ValueError(f"unexpected stored tensors {sorted(self._unused)}")


# --------------------------------------------------------------------------------------------------
# The codecs. pack(tensors, meta, rows, cols) -> (stored, encoding); unpack(reader, meta, encoding,
# rows, cols) -> tensors. `encoding` holds choices the packer made that the reader needs (JSON).


class UniformCodec:
    """codes and (asymmetric) zeros at `bits` bits; fp16 scales; optional int32 g_idx."""

    def pack(self, t, meta, rows, cols):
        bits = meta["bits"]
        stored = {"codes": bitpack.pack(t["codes"], bits), "scales": t["scales"]}
        if meta["sym"]:
            # The symmetric zero point is implied by the width, so it is not stored; a record that
            # claims sym with other zero points would decode differently after a round trip.
            if not bool((t["zeros"] == 1 << (bits - 1)).all()):
                raise ValueError("a symmetric uniform record must have zeros == 2^(bits-1)")
        else:
            stored["zeros"] = bitpack.pack(t["zeros"], bits)
        if "g_idx" in t:
            stored["g_idx"] = t["g_idx"]
        return stored, {}

    def unpack(self, r, meta, encoding, rows, cols):
        bits = meta["bits"]
        groups = _ceil_div(cols, meta["group_size"])
        t = {"codes": r.bits("codes", bits, (rows, cols)), "scales": r.raw("scales", FP16, (rows, groups))}
        if meta["sym"]:
            t["zeros"] = torch.full((rows, groups), 1 << (bits - 1), dtype=torch.uint8, device=r.device)
        else:
            t["zeros"] = r.bits("zeros", bits, (rows, groups))
        if r.has("g_idx"):
            g_idx = r.raw("g_idx", torch.int32, (cols,))
            if (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                raise ValueError(f"g_idx holds group numbers outside [0, {groups})")
            t["g_idx"] = g_idx
        return t


class MixedCodec:
    """Per-group widths: one codes tensor per width that occurs (the columns of its groups, row by
    row), zeros of b >= 2 groups at b bits per width, fp16 means of 1-bit groups in `zeros_b1`."""

    def pack(self, t, meta, rows, cols):
        gs = meta["group_size"]
        group_bits = t["group_bits"]
        _check_group_bits(group_bits)
        column_bits = _group_columns(group_bits, cols, gs)
        stored = {"group_bits": group_bits, "scales": t["scales"]}
        for b in sorted(set(group_bits.tolist())):
            stored[f"codes_b{b}"] = bitpack.pack(t["codes"][:, column_bits == b], b)
            zeros = t["zeros"][:, group_bits == b]
            if b == 1:
                stored["zeros_b1"] = zeros.reshape(-1).contiguous()
            else:
                stored[f"zeros_b{b}"] = bitpack.pack(_integral(zeros, f"zeros of {b}-bit groups"), b)
        return stored, {}

    def unpack(self, r, meta, encoding, rows, cols):
        gs = meta["group_size"]
        groups = _ceil_div(cols, gs)
        group_bits = r.raw("group_bits", torch.uint8, (groups,))
        _check_group_bits(group_bits)
        column_bits = _group_columns(group_bits, cols, gs)
        codes = torch.zeros(rows, cols, dtype=torch.uint8, device=r.device)
        zeros = torch.zeros(rows, groups, dtype=FP16, device=r.device)
        for b in sorted(set(group_bits.tolist())):
            in_width = column_bits == b
            codes[:, in_width] = r.bits(f"codes_b{b}", b, (rows, int(in_width.sum())))
            groups_b = group_bits == b
            n = int(groups_b.sum())
            if b == 1:
                zeros[:, groups_b] = r.raw("zeros_b1", FP16, (rows * n,)).reshape(rows, n)
            else:
                zeros[:, groups_b] = r.bits(f"zeros_b{b}", b, (rows, n)).to(FP16)
        scales = r.raw("scales", FP16, (rows, groups))
        return {"codes": codes, "group_bits": group_bits, "scales": scales, "zeros": zeros}


class PartialBinaryCodec:
    """Salient positions as a bitmap or CSR (whichever is smaller), salient codes at high_bit bits
    only there, signs at 1 bit only elsewhere; fp16 per-row high scales, high zeros at high_bit."""

    def pack(self, t, meta, rows, cols):
        high_bit = meta["high_bit"]
        mask = t["salient_mask"]
        stored: dict[str, torch.Tensor] = {}
        # The same rule as the storage bit figure, so the file and the report agree on the index.
        if csr_index_bits(rows, cols, int(mask.sum())) < rows * cols:
            index_format = "csr"
            # nonzero() lists positions row by row, i.e. in the order mask indexing uses for codes.
            stored["salient_cols"] = bitpack.pack(mask.nonzero()[:, 1], _csr_index_bits(cols))
            stored["salient_row_ends"] = mask.sum(dim=1).cumsum(0).to(torch.int32)
        else:
            index_format = "bitmap"
            stored["salient_mask"] = bitpack.pack_mask(mask)
        stored["signs"] = bitpack.pack(t["signs"][~mask], 1)
        stored["salient_codes"] = bitpack.pack(t["salient_codes"][mask], high_bit)
        stored["high_scales"] = t["high_scales"]
        stored["high_zeros"] = bitpack.pack(t["high_zeros"], high_bit)
        stored["alpha"], stored["mu"] = t["alpha"], t["mu"]
        return stored, {"index_format": index_format}

    def unpack(self, r, meta, encoding, rows, cols):
        high_bit = meta["high_bit"]
        groups = _ceil_div(cols, meta["group_size"])
        index_format = encoding.get("index_format")
        if index_format == "bitmap":
            mask = r.bits("salient_mask", 1, (rows, cols)).bool()
        elif index_format == "csr":
            mask = self._mask_from_csr(r, rows, cols)
        else:
            raise ValueError(f"encoding['index_format'] must be 'bitmap' or 'csr', got {index_format!r}")
        return {
            "salient_mask": mask,
            "signs": r.bits_at("signs", 1, ~mask).bool(),
            "salient_codes": r.bits_at("salient_codes", high_bit, mask),
            "high_scales": r.raw("high_scales", FP16, (rows,)),
            "high_zeros": r.bits("high_zeros", high_bit, (rows,)),
            "alpha": r.raw("alpha", FP16, (rows, groups)),
            "mu": r.raw("mu", FP16, (rows, groups)),
        }

    @staticmethod
    def _mask_from_csr(r: _Reader, rows: int, cols: int) -> torch.Tensor:
        ends = r.raw("salient_row_ends", torch.int32, (rows,)).long()
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        if bool((counts < 0).any()):
            raise ValueError("salient_row_ends must be non-decreasing")
        columns = r.bits("salient_cols", _csr_index_bits(cols), (int(ends[-1]),))
        row_of = torch.repeat_interleave(torch.arange(rows, device=r.device), counts)
        # Strictly increasing columns within a row: no duplicates, and the entries come in the
        # row-major order in which the salient codes were written.
        same_row = row_of[1:] == row_of[:-1]
        if bool((columns >= cols).any()) or bool((same_row & (columns[1:] <= columns[:-1])).any()):
            raise ValueError("salient_cols must be increasing column numbers < cols within each row")
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=r.device)
        mask[row_of, columns.long()] = True
        return mask


class BinaryResidualCodec:
    """Sign plane everywhere, second sign plane at salient columns only, sparse/concentrated flag at
    non-salient columns only, salient columns as a 1-bit-per-column map; fp16 block parameters."""

    def pack(self, t, meta, rows, cols):
        salient = t["salient_columns"].unsqueeze(0).expand(rows, cols)
        stored = {
            "salient_columns": bitpack.pack_mask(t["salient_columns"]),
            "signs": bitpack.pack_mask(t["signs"]),
            "signs2": bitpack.pack(t["signs2"][salient], 1),
            "sparse_mask": bitpack.pack(t["sparse_mask"][~salient], 1),
            "params": t["params"],
        }
        return stored, {}

    def unpack(self, r, meta, encoding, rows, cols):
        blocks = _ceil_div(cols, meta["blocksize"])
        columns = r.bits("salient_columns", 1, (cols,)).bool()
        salient = columns.unsqueeze(0).expand(rows, cols)
        return {
            "salient_columns": columns,
            "signs": r.bits("signs", 1, (rows, cols)).bool(),
            "signs2": r.bits_at("signs2", 1, salient).bool(),
            "sparse_mask": r.bits_at("sparse_mask", 1, ~salient).bool(),
            "params": r.raw("params", FP16, (rows, blocks, 8)),
        }


CODECS = {
    "uniform": UniformCodec(),
    "mixed": MixedCodec(),
    "partial_binary": PartialBinaryCodec(),
    "binary_residual": BinaryResidualCodec(),
}


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
            "layout_version": LAYOUT_VERSION,
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
        if layout not in CODECS:
            raise ValueError(f"unknown layout {layout!r} (known: {', '.join(CODECS)})")
        version = descriptor.get("layout_version")
        if version != LAYOUT_VERSION:
            raise ValueError(f"layout {layout} version {version!r} is not supported (this llmquant reads {LAYOUT_VERSION})")
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
    if layout not in CODECS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(CODECS)})")
    rows, cols = _record_shape(layout, tensors)
    _check_meta(layout, meta)
    check_tensors(layout, tensors, meta, rows, cols)
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise ValueError(f"record meta is not JSON-serialisable: {exc}") from None
    stored, encoding = CODECS[layout].pack(tensors, meta, rows, cols)
    # Copies: side parameters may be views of one method tensor, and safetensors refuses to write
    # tensors that share storage.
    stored = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in stored.items()}
    return PackedLinear(layout, (rows, cols), dict(meta), stored, encoding)


# A [rows, cols] tensor of each layout, to read the shape from.
_FULL_SIZE_TENSOR = {"uniform": "codes", "mixed": "codes", "partial_binary": "salient_mask", "binary_residual": "signs"}


def _record_shape(layout: str, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    name = _FULL_SIZE_TENSOR[layout]
    tensor = tensors.get(name)
    if tensor is None or tensor.dim() != 2:
        raise ValueError(f"{layout} record needs a 2-D {name!r} tensor")
    return tensor.shape[0], tensor.shape[1]


def unpack(packed: PackedLinear) -> dict[str, torch.Tensor]:
    """Stored form -> the record's tensors, on the stored tensors' device. Raises ValueError for
    stored tensors that do not match the descriptor."""
    rows, cols = packed.shape
    _check_meta(packed.layout, packed.meta)
    reader = _Reader(packed.tensors)
    tensors = CODECS[packed.layout].unpack(reader, packed.meta, packed.encoding, rows, cols)
    reader.finish()
    check_tensors(packed.layout, tensors, packed.meta, rows, cols)
    return tensors


def dequantize(packed: PackedLinear) -> torch.Tensor:
    """The float32 weight, by the layout's definition (`layouts.decode`)."""
    return decode(packed.layout, unpack(packed), packed.meta)
