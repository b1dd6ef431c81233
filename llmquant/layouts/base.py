"""What every layout shares: the `Layout` contract, the stored-tensor reader, and small helpers.

A layout is one way of storing a quantized linear (docs/format.md). Each layout module defines one
`Layout` subclass that holds, in one place, everything about it:

- `schema` (+ `optional`): the record's tensors, their dtypes and shapes (the in-memory contract
  between methods, which fill records, and the packed format);
- `meta_spec`: the meta keys its codec reads, with their ranges;
- `decode`: THE meaning of the layout. A method's `record.dequantized` equals `decode(tensors, meta)`
  exactly, and the packed loader calls the same function, so a packed model reproduces the
  fake-quant model bit for bit;
- `bit_figures` / `bit_stats`: its three bit figures (docs/bits.md) and the diagnostics behind them;
- `pack` / `unpack`: the codec between a record's tensors and the tensors stored in a checkpoint;
- `check_stored`: what `unpack` would check of the stored tensors (names, dtypes, sizes, and the
  index values a decode reads), without decoding the codes: what loading a checkpoint checks.

Shapes: rows = out_features, cols = in_features; groups = ceil(cols / size) where size is the
layout's group (or block) size; group g covers columns [g*size, min((g+1)*size, cols)).
Float side parameters are float16 (the storage precision; methods round them when they fit them, so
their error feedback sees exactly what is stored). Booleans are torch.bool.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from llmquant.core.groups import ceil_div
from llmquant.core.record import BitFigures
from llmquant.layouts import bitpack

FP16 = torch.float16
FP16_BITS = 16
SIZE_LIMIT = 2**31 - 1  # largest group size / block size a descriptor may declare

# A schema entry: (dtype, dims), dims a string over r = rows, c = cols, g = groups (or blocks), and
# literal digits for fixed sizes ("rb8" = [rows, blocks, 8]).
Schema = dict[str, tuple[torch.dtype, str]]


def expand_groups(per_group: torch.Tensor, cols: int, size: int) -> torch.Tensor:
    """[..., groups] -> [..., cols]: each group's value repeated over its columns."""
    return per_group.repeat_interleave(size, dim=-1)[..., :cols]


def signs_of(bits: torch.Tensor) -> torch.Tensor:
    """0/1 (or False/True) -> -1/+1 in float32."""
    return bits.to(torch.float32) * 2 - 1


def csr_index_width(cols: int) -> int:
    """Bits of one stored column index: ceil(log2(cols)), at least 1."""
    return max(1, (cols - 1).bit_length())


class Reader:
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

    def packed(self, name: str, width: int, count: int) -> torch.Tensor:
        """A field of `count` values packed at `width` bits, checked for its size, not unpacked."""
        return self.raw(name, torch.uint8, (bitpack.packed_nbytes(count, width),))

    def ones(self, name: str, count: int) -> int:
        """How many of the `count` values of a 1-bit field are set, without unpacking it."""
        return bitpack.count_ones(self.packed(name, 1, count), count)

    def mask(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A boolean field stored at 1 bit for every element of `shape`."""
        count = 1
        for size in shape:
            count *= size
        return bitpack.unpack_mask(self.raw(name, torch.uint8, (bitpack.packed_nbytes(count, 1),)), shape)

    def bits_at(self, name: str, width: int, where: torch.Tensor) -> torch.Tensor:
        """A field packed at `width` bits only where `where` is True; 0 elsewhere."""
        out = torch.zeros(where.shape, dtype=torch.uint8, device=self.device)
        out[where] = self.bits(name, width, (int(where.sum()),))
        return out

    def finish(self) -> None:
        if self._unused:
            raise ValueError(f"unexpected stored tensors {sorted(self._unused)}")


class Layout:
    """One storage layout of a quantized linear (module docstring). Subclasses fill the class
    attributes and implement decode, bit_figures, pack and unpack; the checks are shared."""

    name: ClassVar[str]
    version: ClassVar[int] = 1  # the descriptor's layout_version: changes when the stored tensors change
    schema: ClassVar[Schema]
    optional: ClassVar[Schema] = {}
    # The meta keys the codec reads: an inclusive integer range, or bool.
    meta_spec: ClassVar[dict[str, tuple[int, int] | type]]
    group_key: ClassVar[str]  # the meta key holding the column group (or block) size
    full_size_tensor: ClassVar[str]  # a [rows, cols] tensor of the record, to read its shape from

    # ---- the meaning --------------------------------------------------------------------------

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        """The float32 weight a record stands for. Pure torch, any device."""
        raise NotImplementedError

    def bit_figures(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BitFigures:
        raise NotImplementedError

    def bit_stats(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
        """Diagnostics behind the bit figures, for the report (default: none)."""
        return {}

    # ---- the codec ----------------------------------------------------------------------------

    def pack(
        self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], rows: int, cols: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A record's tensors -> (stored tensors, encoding: the choices the reader needs, JSON)."""
        raise NotImplementedError

    def unpack(
        self, reader: Reader, meta: dict[str, Any], encoding: dict[str, Any], rows: int, cols: int
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_stored(self, reader: Reader, meta: dict[str, Any], encoding: dict[str, Any], rows: int, cols: int) -> None:
        """Raises ValueError exactly where `unpack` would, without decoding the codes: every stored
        tensor's name, dtype and size (computed from the shape, meta, encoding and the small index
        tensors), and the values that would send a decode out of range (group widths, column
        indices, group numbers). Cost: the index tensors, never the codes."""
        raise NotImplementedError

    # ---- shared checks ------------------------------------------------------------------------

    def groups(self, meta: dict[str, Any], cols: int) -> int:
        return ceil_div(cols, meta.get(self.group_key, cols))

    def shape_of(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        tensor = tensors.get(self.full_size_tensor)
        if tensor is None or tensor.dim() != 2:
            raise ValueError(f"{self.name} record needs a 2-D {self.full_size_tensor!r} tensor")
        return tensor.shape[0], tensor.shape[1]

    def check_meta(self, meta: dict[str, Any]) -> None:
        for key, spec in self.meta_spec.items():
            value = meta.get(key)
            if spec is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"meta[{key!r}] must be true or false, got {value!r}")
            elif type(value) is not int or not spec[0] <= value <= spec[1]:
                raise ValueError(f"meta[{key!r}] must be an integer in [{spec[0]}, {spec[1]}], got {value!r}")

    def check_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], rows: int, cols: int) -> None:
        """Raises ValueError if the tensors do not match the schema (names, dtypes, shapes)."""
        n = self.groups(meta, cols)
        dims = {"r": rows, "c": cols, "g": n, "b": n, "8": 8}
        schema = dict(self.schema)
        for key, spec in self.optional.items():
            if key in tensors:
                schema[key] = spec
        if set(tensors) != set(schema):
            raise ValueError(f"{self.name}: tensors {sorted(tensors)} do not match {sorted(schema)}")
        for key, (dtype, shape) in schema.items():
            want = tuple(dims[d] for d in shape)
            got = tensors[key]
            if got.dtype != dtype or tuple(got.shape) != want:
                raise ValueError(f"{self.name}.{key}: expected {dtype} {want}, got {got.dtype} {tuple(got.shape)}")
