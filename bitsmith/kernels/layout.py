"""Kernel-friendly views of a packed quantized linear, built once at load time (pure torch).

bitsmith packs each row of K codes as a little-endian bit stream (packing.py). For 4 and 8 bits with
K * bits % 32 == 0 that stream, read as int32, is already what the GPU kernels want: word j of a row holds
codes 32/bits * j .. in its low-to-high bits. So the codes are a zero-copy view; only the (small) scales
and zero points are rearranged:

  qw     (N, K*bits/32) int32   the module's own qcodes, viewed
  scale  (G', N)                 transposed so a tile of output channels reads contiguous scales
  zero   (G', N) float16         integer or fractional zero points (exact for integers); None if symmetric
  perm   (K,) int32              act-order: stored column j is original column perm[j]
  xidx   (K,) int64              the kernels gather x once into this column order (triton_wq.permute_x)

G' = K / g' groups of g' = the largest power of two (<= 128) dividing both K and the group size, so a
ragged last group (K = 576, g = 128) or a per-channel scale becomes whole power-of-two groups by repeating
scales. That costs a few bytes per group, never a copy of the codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..primitives import group_size_for
from ..recipe import Scheme

KERNEL_BITS = (4, 8)
MAX_GROUP = 128


@dataclass(frozen=True)
class WQPack:
    qw: torch.Tensor                 # (N, K * bits / 32) int32
    scale: torch.Tensor              # (G', N) float16 / bfloat16 / float32
    zero: torch.Tensor | None        # (G', N) float16, None = symmetric (implicit 2^(bits-1))
    perm: torch.Tensor | None        # (K,) int32
    xidx: torch.Tensor               # (K,) int64: x_pi = x[:, xidx], the kernels' column order
    bits: int
    group: int                       # g', a power of two dividing K
    n: int
    k: int
    int_zero: bool = True            # zero points are integers (the packed half-float dequantization needs it)
    scratch: dict = field(default_factory=dict, compare=False, repr=False)   # kernels' reusable workspaces
    tma: dict = field(default_factory=dict, compare=False, repr=False)       # copy-engine tensor maps, verdicts


def unsupported_reason(n: int, k: int, scheme: Scheme, zero_kind: str, transform_spec: dict) -> str | None:
    """Why the weight-only GPU kernels cannot run this layer (None when they can)."""
    if scheme.grid != "int":
        return f"grid {scheme.grid} (kernels cover integer grids)"
    if scheme.bits not in KERNEL_BITS:
        return f"{scheme.bits}-bit codes (kernels cover {KERNEL_BITS})"
    if transform_spec:
        return f"transforms {sorted(transform_spec)} (double-quantized scales or run-time transforms)"
    if (k * scheme.bits) % 32:
        return f"K={k} does not fill whole 32-bit words at {scheme.bits} bits"
    if kernel_group(k, scheme) * scheme.bits < 32:
        return f"group size {scheme.group_size} with K={k} gives groups narrower than one 32-bit word"
    return None


HALF2_UNIT = 4                   # words per unit of the packed-half2 GEMV: one fp16 partial sum, one x scale


def gemv1p_reason(k: int, bits: int, group: int, int_zero: bool) -> str | None:
    """Why the packed-half2 GEMV (triton_gemv_h2) cannot run a layer of K codes at `bits` with kernel
    groups of `group` codes (None when it can). Here, without triton, so that dispatch can ask from the
    module's format before any operand is built."""
    cpw = 32 // bits
    if not int_zero:
        return "fractional zero points (1024 + z must be exact in fp16)"
    if (k // cpw) % HALF2_UNIT:
        return f"K={k} does not fill whole {HALF2_UNIT}-word units"
    if group // cpw < HALF2_UNIT:
        return f"groups of {group} codes are narrower than a {HALF2_UNIT}-word unit"
    return None


def kernel_group(k: int, scheme: Scheme) -> int:
    g = group_size_for(k, scheme.group_size)
    common = math.gcd(g, k)
    return min(common & -common, MAX_GROUP)          # largest power of two dividing both


def build(qcodes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, perm: torch.Tensor | None,
          scheme: Scheme, n: int, k: int) -> WQPack:
    """`zero` is (N, G) float (unpacked) or None when symmetric; `scale` (N, G) as stored."""
    g = group_size_for(k, scheme.group_size)
    gk = kernel_group(k, scheme)
    rep = g // gk                                                  # kernel groups per stored group
    n_kgroups = k // gk

    def expand(t: torch.Tensor) -> torch.Tensor:                  # (N, G) -> (G', N)
        return t.repeat_interleave(rep, dim=1)[:, :n_kgroups].t().contiguous()

    qw = qcodes.contiguous().view(torch.int32).view(n, k * scheme.bits // 32)
    cpw = 32 // scheme.bits
    # position i * (K / cpw) + j of x_pi <- stored column cpw * j + i <- original column perm[cpw * j + i]
    xidx = torch.arange(k, device=qcodes.device).view(k // cpw, cpw).t().reshape(-1)
    if perm is not None:
        xidx = perm.to(device=qcodes.device, dtype=torch.long)[xidx]
    z16 = None if zero is None else expand(zero.to(torch.float16))
    int_zero = z16 is None or bool(torch.equal(z16, z16.round()))
    return WQPack(qw=qw, scale=expand(scale), zero=z16, int_zero=int_zero,
                  perm=None if perm is None else perm.to(torch.int32).contiguous(), xidx=xidx.contiguous(),
                  bits=scheme.bits, group=gk, n=n, k=k)
