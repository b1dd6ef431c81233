"""Dense n-bit packing of integer tensors into uint8 byte streams, in pure torch (any device).

The stream is the flattened (row-major) values, each written as `width` bits least-significant bit
first, one after another with no padding between values; only the last byte is zero-padded. So
`count` values of `width` bits take exactly ceil(count * width / 8) bytes, which is what the
layouts' storage bit figures count, and 1-bit packing of a boolean mask is the same code path.

Packing works on bit planes: expand each value into `width` 0/1 bytes, lay them out as one bit
stream, and fold every 8 stream bits into a byte. The only Python loops run over bit positions
(at most 8 per byte, at most 32 per value), never over elements.
"""

from __future__ import annotations

import math

import torch

from llmquant.core.groups import ceil_div

MAX_WIDTH = 32  # column indices of CSR salient lists need more than 8 bits


def packed_nbytes(count: int, width: int) -> int:
    """Bytes that `count` values of `width` bits occupy in a packed stream."""
    return ceil_div(count * width, 8)


def _check_width(width: int) -> None:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"bit width must be in 1..{MAX_WIDTH}, got {width}")


def _value_dtype(width: int) -> torch.dtype:
    # uint8 keeps the expanded bit planes at one byte per bit for the common widths; wider values
    # (CSR column indices) need a signed 64-bit container because torch lacks wide unsigned shifts.
    return torch.uint8 if width <= 8 else torch.int64


def pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """values (any shape; integer or bool, each in [0, 2^width)) -> 1-D uint8 stream."""
    _check_width(width)
    if values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(f"can only bit-pack integer or bool tensors, got {values.dtype}")
    flat = values.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << width):
        raise ValueError(f"values outside [0, 2^{width}) cannot be packed at {width} bits")
    dtype = _value_dtype(width)
    flat = flat.to(dtype)
    shifts = torch.arange(width, dtype=dtype, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).reshape(-1, 8)
    packed = torch.zeros(stream.shape[0], dtype=torch.uint8, device=flat.device)
    for bit in range(8):
        packed |= stream[:, bit] << bit
    return packed


def unpack(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of `pack`: 1-D uint8 stream -> 1-D tensor of `count` values (uint8 for width <= 8,
    int64 above). The stream must have exactly the length `pack` produces.

    This runs on every forward of the `torch` backend, so it avoids per-bit passes: widths 1, 2 and 4
    look each byte up in a 256-entry table; other widths read chunks of lcm(width, 8) bits, a whole
    number of bytes and of values (3 bytes hold eight 3-bit values), combined into one integer of
    which every value is a shift and a mask."""
    _check_width(width)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"a packed stream is a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    expected = packed_nbytes(count, width)
    if packed.numel() != expected:
        raise ValueError(f"{count} values at {width} bits take {expected} bytes, found {packed.numel()}")
    if width == 8:
        return packed.clone()
    if 8 % width == 0:  # widths 1, 2, 4: each byte holds 8 / width values; look them up
        return _byte_table(width, packed.device).index_select(0, packed.int()).reshape(-1)[:count]
    chunk_bits = width * 8 // math.gcd(width, 8)  # lcm(width, 8): whole bytes and whole values
    if chunk_bits > 63:  # widths 9..32 other than 16, 24, 32 (only CSR column indices): bit by bit
        return _unpack_bitwise(packed, width, count)
    chunk_bytes, per_chunk = chunk_bits // 8, chunk_bits // width
    chunks = -(-count // per_chunk)
    data = torch.nn.functional.pad(packed, (0, chunks * chunk_bytes - packed.numel())).view(chunks, chunk_bytes)
    container = torch.int32 if chunk_bits <= 31 else torch.int64
    combined = data[:, 0].to(container)
    for byte in range(1, chunk_bytes):
        combined |= data[:, byte].to(container) << (8 * byte)
    shifts = torch.arange(0, chunk_bits, width, dtype=container, device=packed.device)
    values = (combined.unsqueeze(1) >> shifts) & ((1 << width) - 1)
    return values.reshape(-1)[:count].to(_value_dtype(width))


_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def _byte_table(width: int, device: torch.device) -> torch.Tensor:
    """[256, 8 / width] uint8: the values a byte holds at `width` bits, least significant first."""
    key = (width, str(device))
    if key not in _TABLES:
        shifts = torch.arange(0, 8, width, dtype=torch.uint8)
        table = (torch.arange(256, dtype=torch.uint8).unsqueeze(1) >> shifts) & ((1 << width) - 1)
        _TABLES[key] = table.contiguous().to(device)
    return _TABLES[key]


def _unpack_bitwise(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * width].reshape(count, width)
    dtype = _value_dtype(width)
    values = torch.zeros(count, dtype=dtype, device=packed.device)
    for bit in range(width):
        values |= stream[:, bit].to(dtype) << bit
    return values


def count_ones(packed: torch.Tensor, count: int) -> int:
    """The number of 1 bits among the first `count` bits of a 1-bit stream of the right length (the
    values `unpack(packed, 1, count)` would hold that are 1), without unpacking it: a bytewise
    popcount in uint8 arithmetic (temporaries of the stream's size, not 8x or 64x it)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(count, 1):
        raise ValueError(f"{count} values at 1 bit take {packed_nbytes(count, 1)} bytes, found {tuple(packed.shape)}")
    whole, rest = divmod(count, 8)
    x = packed[:whole]
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    ones = int(((x + (x >> 4)) & 0x0F).sum()) if whole else 0
    if rest:
        ones += bin(int(packed[whole]) & ((1 << rest) - 1)).count("1")
    return ones


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean tensor -> 1 bit per element."""
    return pack(mask, 1)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask` for a mask of the given shape."""
    count = 1
    for size in shape:
        count *= size
    return unpack(packed, 1, count).reshape(shape).bool()
