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
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise BitsmithError(f"codes out of range for {bits}-bit packing: [{int(codes.min())}, {int(codes.max())}]")
    if 8 % bits == 0:                    # 1, 2, 4, 8 bits: whole codes per byte, OR-ed in place as uint8
        per = 8 // bits
        c8 = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-k) % per)).view(n, -1, per)
        out = c8[..., 0].clone()
        for i in range(1, per):
            out |= c8[..., i] << (i * bits)
        return out
    # 3, 5, 6, 7 bits: expand to single bits, then regroup by 8.
    c = codes.to(torch.int32)
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
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        parts = [(packed >> (i * bits)) & mask for i in range(per)]
        return torch.stack(parts, -1).view(n, -1)[:, :k]
    p = packed.to(torch.int32)
    bitstream = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(n, -1)
    bitstream = bitstream[:, : k * bits].reshape(n, k, bits)
    return (bitstream << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)
