"""QuantLinear on the CPU through torch's own weight-only integer kernels (no extra dependency).

int8: `aten._weight_int8pack_mm(x, w (N, K) int8, scales (N,))` computes x (w * s)^T for symmetric
per-channel weights. bitsmith stores unsigned codes q with zero z, so w = q - 128 and an asymmetric zero
becomes a rank-one correction: x ((q - z) s)^T = x ((q - 128) s)^T - (sum_k x) ((z - 128) s).
int4: `aten._weight_int4pack_mm_for_cpu(x, packed, g, sz (G, N, 2))` (tinygemm's convention,
w = (q - 8) * scale + zero) with zero = (8 - z) * scale, so (q - z) * s comes out exactly.
Act-order permutes x instead of the weights. Both kernels need whole groups (no ragged last group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..primitives import group_size_for
from ..recipe import Scheme

INT4_GROUPS = (32, 64, 128, 256)


def op(name: str):
    return getattr(torch.ops.aten, name, None) if hasattr(torch.ops.aten, name) else None


def missing_ops() -> dict[str, str | None]:
    """{kernel: why it is unusable in this torch build, or None}."""
    return {"cpu_int8": None if op("_weight_int8pack_mm") else "torch lacks aten._weight_int8pack_mm",
            "cpu_int4": None if op("_weight_int4pack_mm_for_cpu") and op("_convert_weight_to_int4pack_for_cpu")
            else "torch lacks aten._weight_int4pack_mm_for_cpu"}


def unsupported_reason(name: str, n: int, k: int, scheme: Scheme, transform_spec: dict) -> str | None:
    if scheme.grid != "int":
        return f"grid {scheme.grid} (integer grids only)"
    if transform_spec:
        return f"transforms {sorted(transform_spec)}"
    g = group_size_for(k, scheme.group_size)
    if name == "cpu_int8":
        if scheme.bits != 8:
            return f"{scheme.bits}-bit codes (this kernel is 8-bit)"
        if g != k:
            return f"group size {scheme.group_size} (this kernel is per-channel)"
        return None
    if scheme.bits != 4:
        return f"{scheme.bits}-bit codes (this kernel is 4-bit)"
    if g not in INT4_GROUPS or k % g:
        return f"group size {g} with K={k} (needs one of {INT4_GROUPS} dividing K)"
    if n % 16:
        return f"N={n} (torch's int4 CPU packing needs N divisible by 16)"
    return None


@dataclass(frozen=True)
class CpuPack:
    w: torch.Tensor                    # int8 (N, K) or the int4 kernel's packed layout
    scale: torch.Tensor                # int8: (N,) float32; int4: (G, N, 2) float32 scale-and-zero
    zcorr: torch.Tensor | None         # int8 asymmetric: (N,) (z - 128) * s
    perm: torch.Tensor | None          # (K,) long
    group: int
    bits: int


def build(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, perm: torch.Tensor | None,
          scheme: Scheme, k: int) -> CpuPack:
    """codes (N, K) uint8 unpacked, scale (N, G), zero (N, G) float or None (symmetric)."""
    s = scale.float()
    p = None if perm is None else perm.long()
    g = group_size_for(k, scheme.group_size)
    if scheme.bits == 8:
        w8 = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        zc = None if zero is None else ((zero.float() - 128) * s).view(-1)
        return CpuPack(w8, s.view(-1).contiguous(), zc, p, g, 8)
    z = torch.full_like(s, 8.0) if zero is None else zero.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    sz = torch.stack([s.t(), ((8 - z) * s).t()], -1).contiguous()              # (G, N, 2)
    return CpuPack(packed, sz, None, p, g, 4)


def linear(x2: torch.Tensor, p: CpuPack, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) float -> (M, N) in x's dtype."""
    if p.perm is not None:
        x2 = x2.index_select(1, p.perm)
    if p.bits == 8:
        # asymmetric: y = sum x (q - 128) s - sum(x) (z - 128) s cancels, so both terms stay fp32 (in bf16
        # the rounding of the two large terms put 1 entry in 240 past 1% on the H200 host's CPU)
        xf = x2 if p.zcorr is None else x2.float()
        y = torch.ops.aten._weight_int8pack_mm(xf, p.w, p.scale.to(xf.dtype))
        if p.zcorr is not None:
            y = (y - xf.sum(-1, keepdim=True) * p.zcorr.float()).to(x2.dtype)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, p.w, p.group, p.scale.to(x2.dtype))
    return y if bias is None else y + bias.to(y.dtype)
