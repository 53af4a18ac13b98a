"""Fused dequantize + matmul for small M on the CPU, as C++ that TorchInductor generates from plain torch ops.

Why: at decode a linear is memory-bound, so the bytes read decide its time. torch 2.13's weight-only CPU
kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, cpu.py) convert each weight to float before
the multiply-add and run several times below the memory rate (README, issue 8), so int8/int4 decoded slower
than fp32. Written here as shift, mask, scale, take off the zero, multiply by x and sum, the expression is
fused by Inductor into one vectorized C++ loop nest that reads each code byte once and keeps the float
weights in registers.

Layout (built once per module, cached like the other kernels' operands): the codes of one group of g
columns are split into P = 8 / bits sub-blocks of h = g / P columns; byte j of a group holds code p * h + j
at bit p * bits. One byte load then feeds P sub-blocks through plain shifts and no interleaving, and x is
split into the same sub-blocks. Codes of 1 to 8 bits are stored at the next of 2, 4 or 8 bits (3-bit codes
in nibbles: a third more bytes than bitsmith's 3-bit stream, still 2.7x fewer than int8); the group must
divide K and be a multiple of P. The layout is a copy beside the module's packed codes (like cpu.py's), so
a layer's codes are held twice while this kernel is in use. Codebook grids (NF4, FP4) are not run: a
16-entry lookup per weight compiled to a gather that was slower than fp32 (1536x576: 366 vs 295 us).

Each (M, N, K, G, bits, threads) compiles once (about 1 s here, then Inductor's on-disk cache), through
`torch._inductor.compile` on a `make_fx` graph, kept in this module's own dict. torch.compile would guard
on shapes and recompile per shape of a model until its recompile limit (8), then silently run eagerly; its
dynamic-shape code was not vectorized here (4-20x slower, measured). The generated code bakes in the
OpenMP thread count, so the count is part of the key.
"""

from __future__ import annotations

import shutil
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..primitives import group_size_for, symmetric_zero
from ..recipe import Scheme

STORE_BITS = (2, 4, 8)


def store_bits(bits: int) -> int:
    """The kernel's storage width for `bits`-bit codes: the next of 2, 4, 8."""
    return next(b for b in STORE_BITS if b >= bits)


_compiled: dict[tuple, object] = {}
_lock = threading.Lock()
_broken: list[str] = []          # why compiling failed once in this process (then the eager math runs)


@lru_cache(maxsize=1)
def missing() -> str | None:
    """Why Inductor cannot build CPU kernels here (None when it can): it needs a C++ compiler."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:       # a torch build without Inductor
        return f"torch._inductor unavailable ({type(e).__name__})"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++ / clang++) on PATH for TorchInductor"
    return None


def usable() -> str | None:
    return missing() or (_broken[0] if _broken else None)


def unsupported_reason(n: int, k: int, scheme: Scheme, transform_spec: dict) -> str | None:
    if scheme.grid != "int":
        return f"grid {scheme.grid} (integer grids only)"
    if transform_spec:
        return f"transforms {sorted(transform_spec)}"
    if not 1 <= scheme.bits <= 8:
        return f"{scheme.bits}-bit codes (this kernel reads 1 to 8 bits)"
    g, per = group_size_for(k, scheme.group_size), 8 // store_bits(scheme.bits)
    if k % g or g % per:
        return f"group size {g} with K={k} (needs a group dividing K, a multiple of {per})"
    return None


@dataclass(frozen=True)
class FusedPack:
    w: torch.Tensor                    # (N, K * bits / 8) uint8 in the sub-block layout above, at `bits`
    scale: torch.Tensor                # (N, G) float32
    zs: torch.Tensor                   # (N, G) float32 zero point x scale (the implicit zero if symmetric)
    perm: torch.Tensor | None          # (K,) long: codes describe W[:, perm]
    bits: int                          # the storage width (store_bits of the scheme's)


def pack_codes(codes: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """(N, K) uint8 codes -> (N, K * bits / 8) uint8; byte j of each group holds code p * h + j at bit
    p * bits."""
    n, k = codes.shape
    per = 8 // bits
    sub = codes.view(n, k // g, per, g // per)                       # (N, G, P, h)
    out = sub[:, :, 0].clone()
    for p in range(1, per):
        out |= sub[:, :, p] << (p * bits)
    return out.view(n, -1).contiguous()


def build(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, perm: torch.Tensor | None,
          scheme: Scheme, k: int) -> FusedPack:
    """codes (N, K) uint8 unpacked, scale (N, G), zero (N, G) or None (symmetric)."""
    g = group_size_for(k, scheme.group_size)
    s = scale.float().contiguous()
    z = torch.full_like(s, float(symmetric_zero(scheme))) if zero is None else zero.float()
    p = None if perm is None else perm.long()
    bits = store_bits(scheme.bits)
    return FusedPack(pack_codes(codes, bits, g), s, (z * s).contiguous(), p, bits)


def fused_math(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, zs: torch.Tensor,
               bits: int) -> torch.Tensor:
    """(M, K) float32 x (N, K*bits/8) packed codes -> (M, N) float32, y = x ((q - z) s)^T, given s and
    zs = z s per (row, group). Plain torch: this is what Inductor compiles, and what runs eagerly if it
    cannot. Two spellings of the same sum, whichever Inductor turned into the faster loop on SmolLM2's
    shapes (throwaway timings while writing this, 2 threads, M = 1, weights from DRAM; the kernel as it
    stands is timed by benchmarks/cpu_kernels.py):
    - grouped: sum over (group, column) of x (q s - zs): one accumulator per row, the group's s and zs
      broadcast into the inner loop (1536x576 4-bit g64: 37 us, against 58 for the form below, which
      reduces every group horizontally);
    - per-channel: s (sum_j x q) - zs (sum_j x), the zero taken off once through the sum of x (8-bit:
      39 vs 43 us; at M = 4 83 vs 169).
    Bytes are widened to int32 before the shifts: with the zero taken off through the sum of x, that took
    the first version (uint8 shifts, q - z per weight) from 87 to 50 us at 4-bit g64; not measured apart."""
    m, k = x.shape
    n, groups = s.shape
    per, mask = 8 // bits, (1 << bits) - 1
    xv = x.view(m, 1, groups, per, k // groups // per)              # (M, 1, G, P, h)
    wv = w.view(1, n, groups, -1).to(torch.int32)                    # (1, N, G, h)
    sv, zv = s.view(1, n, groups, 1), zs.view(1, n, groups, 1)
    acc = None
    for p in range(per):
        q = ((wv >> (p * bits)) & mask).float()
        if groups > 1:
            part = (xv[:, :, :, p] * (q * sv - zv)).sum((-2, -1))   # (M, N)
        else:
            part = (xv[:, :, :, p] * q).sum((-2, -1))                # (M, N), before the scale
        acc = part if acc is None else acc + part
    if groups > 1:
        return acc
    return acc * s.view(1, n) - x.sum(-1, keepdim=True) * zs.view(1, n)


def _kernel(x: torch.Tensor, pack: FusedPack):
    key = (tuple(x.shape), tuple(pack.w.shape), tuple(pack.scale.shape), pack.bits, torch.get_num_threads())
    fn = _compiled.get(key)
    if fn is None and usable() is None:          # no compiler (or a failed compile): the eager math
        with _lock:
            fn = _compiled.get(key)
            if fn is None:
                try:
                    from torch._inductor import compile as inductor_compile
                    from torch.fx.experimental.proxy_tensor import make_fx

                    args = (x, pack.w, pack.scale, pack.zs)
                    graph = make_fx(lambda a, b, c, d: fused_math(a, b, c, d, pack.bits))(*args)
                    fn = _compiled[key] = inductor_compile(graph, list(args))
                except Exception as e:   # a broken tool chain must not break the forward: run eagerly
                    _broken.append(f"Inductor failed to compile ({type(e).__name__}: {str(e)[:120]})")
                    warnings.warn(f"bitsmith: cpu_fused disabled, {_broken[0]}; using the reference path",
                                  stacklevel=3)
    return fn


def linear(x2: torch.Tensor, pack: FusedPack, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) float -> (M, N) in x's dtype."""
    xf = x2.float()
    if pack.perm is not None:
        xf = xf.index_select(1, pack.perm)
    xf = xf.contiguous()
    fn = _kernel(xf, pack)
    args = (xf, pack.w, pack.scale, pack.zs)
    y = fn(*args) if fn is not None else fused_math(*args, pack.bits)
    y = y[0] if isinstance(y, (tuple, list)) else y
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)
