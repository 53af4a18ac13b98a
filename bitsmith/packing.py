"""Bit packing of unsigned codes (1..8 bits) into bytes, bit-exact, nothing else.

Layout: each row of K codes is one little-endian bit stream, code j occupying bits [j*b, (j+1)*b) counted
from the least significant bit of byte 0; a row is padded with zero bits to a whole number of bytes, so
rows stay independent (a kernel can find row n at n * row_bytes). For b = 4 this is the familiar
"low nibble first" layout; for b = 8 it is the codes themselves.
"""

from __future__ import annotations

import torch

from .errors import BitsmithError
from .numerics import check_bits


def packed_row_bytes(k: int, bits: int) -> int:
    return (k * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integer codes in [0, 2**bits) -> (N, ceil(K*bits/8)) uint8."""
    check_bits(bits)
    if codes.dim() != 2:
        raise BitsmithError(f"pack expects a 2-D (N, K) tensor of codes, got shape {tuple(codes.shape)}")
    n, k = codes.shape
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise BitsmithError(f"codes out of range for {bits}-bit packing: [{int(c.min())}, {int(c.max())}]")
    if 8 % bits == 0:                    # 1, 2, 4, 8 bits: whole codes per byte, no bit expansion needed
        per = 8 // bits
        pad = (-k) % per
        c = torch.nn.functional.pad(c, (0, pad)).view(n, -1, per)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # 3, 5, 6, 7 bits: expand to single bits, then regroup by 8.
    shifts = torch.arange(bits, dtype=torch.int32)
    bitstream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(n, k * bits)
    bitstream = torch.nn.functional.pad(bitstream, (0, (-(k * bits)) % 8)).view(n, -1, 8)
    return (bitstream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """(N, ceil(K*bits/8)) uint8 -> (N, K) uint8 codes; the inverse of `pack`."""
    check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise BitsmithError(f"unpack expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, nbytes = packed.shape
    if nbytes != packed_row_bytes(k, bits):
        raise BitsmithError(
            f"packed rows have {nbytes} bytes but {k} codes of {bits} bits need {packed_row_bytes(k, bits)}"
        )
    p = packed.to(torch.int32)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return ((p.unsqueeze(-1) >> shifts) & mask).reshape(n, -1)[:, :k].to(torch.uint8)
    bitstream = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(n, -1)
    bitstream = bitstream[:, : k * bits].reshape(n, k, bits)
    return (bitstream << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)
