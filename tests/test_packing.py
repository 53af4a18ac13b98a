"""Bit packing: bit-exact round trips for every width and odd shapes; the documented layout."""

import pytest
import torch

from bitsmith import BitsmithError
from bitsmith.packing import pack, packed_row_bytes, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (4, 100), (2, 576), (7, 1537)])
def test_round_trip_bit_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack(packed, bits, shape[1]), codes)


def test_layout_low_bits_first():
    assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack(torch.tensor([[1, 0, 3, 2]], dtype=torch.uint8), 2).tolist() == [[0b10110001]]
    # 3 bits: codes 5, 6, 7 -> bit stream 101 011 111 (LSB first) = 0b11_011_101, 0b1
    assert pack(torch.tensor([[5, 6, 7]], dtype=torch.uint8), 3).tolist() == [[0b11110101, 0b1]]


def test_extreme_values_every_width():
    for bits in range(1, 9):
        codes = torch.full((2, 9), (1 << bits) - 1, dtype=torch.uint8)
        codes[1] = 0
        assert torch.equal(unpack(pack(codes, bits), bits, 9), codes)


def test_bad_input():
    with pytest.raises(BitsmithError, match="out of range"):
        pack(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(BitsmithError, match="bits"):
        pack(torch.zeros(1, 1, dtype=torch.uint8), 9)
    with pytest.raises(BitsmithError, match="bytes"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 4)
