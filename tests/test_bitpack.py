"""Dense n-bit packing: exact round trips, exact sizes, and a fixed bit order (the file format)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmquant.layouts import bitpack


def random_values(count: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << width, (count,), generator=generator)
    if count >= 2:  # always include both extremes of the range
        values[0], values[-1] = 0, (1 << width) - 1
    return values


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 32])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_round_trip_and_size(width, count):
    values = random_values(count, width, seed=width * 1000 + count)
    packed = bitpack.pack(values, width)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == bitpack.packed_nbytes(count, width) == -(-count * width // 8)
    unpacked = bitpack.unpack(packed, width, count)
    assert unpacked.dtype == (torch.uint8 if width <= 8 else torch.int64)
    assert torch.equal(unpacked.long(), values)


def test_shape_does_not_matter_only_row_major_order():
    values = random_values(6 * 5, 3, seed=1).reshape(6, 5)
    assert torch.equal(bitpack.pack(values, 3), bitpack.pack(values.reshape(-1), 3))
    assert torch.equal(bitpack.unpack(bitpack.pack(values, 3), 3, 30).reshape(6, 5).long(), values)


def test_bit_order_is_lsb_first_and_contiguous():
    # The on-disk format: value i occupies stream bits [i*w, (i+1)*w), least significant bit first.
    assert bitpack.pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b00001101, 0b1]
    assert bitpack.pack(torch.tensor([3, 1, 2]), 2).tolist() == [0b100111]
    # 3-bit values straddle bytes: 5 = 101, 6 = 110, 7 = 111 -> stream 101 011 111 (LSB first)
    assert bitpack.pack(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]
    assert bitpack.pack(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


def test_masks_round_trip_with_their_shape():
    generator = torch.Generator().manual_seed(3)
    mask = torch.rand(13, 21, generator=generator) < 0.3
    packed = bitpack.pack_mask(mask)
    assert packed.numel() == -(-13 * 21 // 8)
    assert torch.equal(bitpack.unpack_mask(packed, (13, 21)), mask)


@pytest.mark.parametrize("values", [torch.tensor([4]), torch.tensor([-1]), torch.tensor([0, 300])])
def test_values_out_of_range_are_refused(values):
    with pytest.raises(ValueError, match="outside"):
        bitpack.pack(values, 2)


def test_float_values_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match="integer or bool"):
        bitpack.pack(torch.tensor([1.0]), 2)
    with pytest.raises(ValueError, match="bit width"):
        bitpack.pack(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="bit width"):
        bitpack.unpack(torch.zeros(1, dtype=torch.uint8), 33, 1)


def test_unpack_refuses_a_stream_of_the_wrong_length_or_type():
    packed = bitpack.pack(random_values(10, 3, seed=2), 3)
    with pytest.raises(ValueError, match="take 4 bytes, found 3"):
        bitpack.unpack(packed[:3], 3, 10)
    with pytest.raises(ValueError, match="take 4 bytes, found 5"):
        bitpack.unpack(torch.cat([packed, packed[:1]]), 3, 10)
    with pytest.raises(ValueError, match="1-D uint8"):
        bitpack.unpack(packed.to(torch.int16), 3, 10)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 32), data=st.data())
def test_round_trip_property(width, data):
    values = data.draw(st.lists(st.integers(0, (1 << width) - 1), max_size=40))
    tensor = torch.tensor(values, dtype=torch.int64)
    unpacked = bitpack.unpack(bitpack.pack(tensor, width), width, len(values))
    assert unpacked.long().tolist() == values
