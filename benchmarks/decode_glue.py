"""Fused glue for the GPU decode benchmark (benchmarks/decode_gpu.py).
`glue` variant: one launch for "residual add + RMSNorm" and one for "SiLU(gate) * up", where the plain
model launches several small kernels each. `attn` variant: one launch for a decode step's attention
(split over the context, flash-decoding style, reduced by the last program of each head group), which also
writes the new token's k and v into the cache, where the plain model launches two cache copies, cuDNN's
attention and its reduction. `pdl`: these launches are programmatic dependent launches (Hopper): each
kernel's programs may be scheduled while the kernel before finishes, and wait for it before reading.
bf16 and the quantized models use the same glue, so it changes what the linears' share of a step is, not
how they are timed. Checked against the torch ops in `check()` (run by decode_gpu).
Knobs for experiments (read per call): BITSMITH_ATTN_BLOCK = positions per attention program (default 32),
BITSMITH_PDL_TRIGGER = start | late (default late: when these kernels let the next one be scheduled).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from bitsmith.kernels.triton_wq import _pdl_begin, _pdl_end, pdl_mode


@triton.jit
def _add_rmsnorm_kernel(X, R, W, Y, D, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Row-wise: x += r (written back, the residual stream), y = x / rms(x) * w."""
    _pdl_begin(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    msk = c < D
    x = tl.load(X + row * D + c, mask=msk, other=0.0).to(tl.float32)
    if HAS_R:
        x += tl.load(R + row * D + c, mask=msk, other=0.0).to(tl.float32)
        tl.store(X + row * D + c, x.to(X.dtype.element_ty), mask=msk)
        x = x.to(X.dtype.element_ty).to(tl.float32)          # normalize what the residual stream holds
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    _pdl_end(PDL)
    w = tl.load(W + c, mask=msk, other=0.0).to(tl.float32)
    tl.store(Y + row * D + c, (x * inv * w).to(Y.dtype.element_ty), mask=msk)


@triton.jit
def _silu_mul_kernel(GU, Y, F, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """GU (B, 2F) = [gate | up] -> Y (B, F) = silu(gate) * up."""
    _pdl_begin(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = c < F
    g = tl.load(GU + row * 2 * F + c, mask=msk, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * F + F + c, mask=msk, other=0.0).to(tl.float32)
    _pdl_end(PDL)
    tl.store(Y + row * F + c, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=msk)


@triton.jit
def _decode_attn_kernel(Q, KN, VN, KC, VC, OUT, WO, WML, CNT, L, pos, sm_scale, sq, skn, svn, scb, sch,
                        H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr, BLOCK: tl.constexpr,
                        SPLITS: tl.constexpr, PDL: tl.constexpr = False):
    """One decode step's attention for one sequence and kv head (program axis 0: b * KV + h) over one block of
    BLOCK cached positions (axis 1). Query heads h * G .. h * G + G - 1 (G = H / KV, grouped-query) share the
    block's k and v; padded to 16 rows for the tensor-core dots. Position `pos` takes the new token's k, v
    (KN, VN), which the program holding it also writes into the caches KC, VC (B, KV, L, HD). Each program
    leaves its block's max score, sum of exponentials and unnormalized output in WML / WO; the last program
    of a head group (counter CNT, reset after) combines the SPLITS blocks in a fixed order into OUT (B, H * HD)."""
    _pdl_begin(PDL)
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    G: tl.constexpr = H // KV
    GP: tl.constexpr = 16
    rg = tl.arange(0, GP)
    rd = tl.arange(0, HD)
    rk = sp * BLOCK + tl.arange(0, BLOCK)
    gmask = rg < G
    q = tl.load(Q + b * sq + (h * G + rg)[:, None] * HD + rd[None, :], mask=gmask[:, None], other=0.0)
    new = (rk == pos)[:, None]
    cache = (rk < L)[:, None] & (rk != pos)[:, None]
    off = b * scb + h * sch + rk[:, None] * HD + rd[None, :]
    k = tl.load(KC + off, mask=cache, other=0.0)
    v = tl.load(VC + off, mask=cache, other=0.0)
    kn = tl.load(KN + b * skn + h * HD + rd)
    vn = tl.load(VN + b * svn + h * HD + rd)
    k = tl.where(new, kn[None, :], k)
    v = tl.where(new, vn[None, :], v)
    tl.store(KC + off, k, mask=new)
    tl.store(VC + off, v, mask=new)
    sc = tl.dot(q, tl.trans(k)) * sm_scale                                   # (GP, BLOCK) fp32
    sc = tl.where((rk < L)[None, :], sc, float("-inf"))
    m = tl.max(sc, axis=1)
    p = tl.exp(sc - m[:, None])
    lsum = tl.sum(p, axis=1)
    o = tl.dot(p.to(v.dtype), v)                                             # (GP, HD) fp32
    part = bh * SPLITS + sp
    tl.store(WO + (part * GP + rg)[:, None] * HD + rd[None, :], o, mask=gmask[:, None])   # the G real rows
    tl.store(WML + part * 2 * GP + rg, m)
    tl.store(WML + part * 2 * GP + GP + rg, lsum)
    _pdl_end(PDL)
    tl.debug_barrier()                               # every thread's partial is written before the release
    done = tl.atomic_add(CNT + bh, 1, sem="acq_rel", scope="gpu")
    if done == SPLITS - 1:
        mt = tl.full((GP,), float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            mt = tl.maximum(mt, tl.load(WML + (bh * SPLITS + s) * 2 * GP + rg, cache_modifier=".cg"))
        lt = tl.zeros((GP,), tl.float32)
        ot = tl.zeros((GP, HD), tl.float32)
        for s in tl.static_range(SPLITS):
            base = (bh * SPLITS + s) * 2 * GP
            wgt = tl.exp(tl.load(WML + base + rg, cache_modifier=".cg") - mt)
            lt += wgt * tl.load(WML + base + GP + rg, cache_modifier=".cg")
            ot += wgt[:, None] * tl.load(WO + ((bh * SPLITS + s) * GP + rg)[:, None] * HD + rd[None, :],
                                         mask=gmask[:, None], other=0.0, cache_modifier=".cg")
        out = ot / lt[:, None]
        tl.store(OUT + b * (H * HD) + (h * G + rg)[:, None] * HD + rd[None, :], out.to(OUT.dtype.element_ty),
                 mask=gmask[:, None])
        tl.atomic_xchg(CNT + bh, 0, sem="relaxed", scope="gpu")


_ATTN_SCRATCH: dict = {}


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                     pos: int, heads: int, pdl: bool = False, block: int | None = None) -> torch.Tensor:
    """q (B, heads * HD), k, v (B, KV * HD) of the new token (row-strided views are fine); kc, vc (B, KV, L, HD)
    caches, positions 0..L-1 attended, `pos` overwritten with k, v. Returns (B, heads * HD) =
    softmax(q k^T / sqrt(HD)) v per head, as F.scaled_dot_product_attention(..., enable_gqa=True)."""
    b, kv, length, hd = kc.shape
    assert kc.is_contiguous() and vc.is_contiguous() and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    if heads // kv > 16:
        raise ValueError(f"decode_attention: at most 16 query heads per kv head, got {heads // kv}")
    if block is None:       # positions per program: 16, 32 and 64 were within run-to-run noise (H200, README)
        import os
        block = int(os.environ.get("BITSMITH_ATTN_BLOCK", "32"))
    splits = triton.cdiv(length, block)
    key = (q.device, b * kv, splits)
    if key not in _ATTN_SCRATCH:
        _ATTN_SCRATCH[key] = (torch.empty(b * kv * splits * 16 * hd, device=q.device, dtype=torch.float32),
                              torch.empty(b * kv * splits * 32, device=q.device, dtype=torch.float32),
                              torch.zeros(b * kv, device=q.device, dtype=torch.int32))
    wo, wml, cnt = _ATTN_SCRATCH[key]
    o = torch.empty(b, heads * hd, device=q.device, dtype=q.dtype)
    _decode_attn_kernel[(b * kv, splits)](q, k, v, kc, vc, o, wo, wml, cnt, length, pos, 1.0 / math.sqrt(hd),
                                          q.stride(0), k.stride(0), v.stride(0), kc.stride(0), kc.stride(1),
                                          H=heads, KV=kv, HD=hd, BLOCK=block, SPLITS=splits, PDL=_mode(pdl),
                                          num_warps=4, **_launch(pdl))
    return o


def _launch(pdl: bool) -> dict:
    """Launch options: launch_pdl only when asked (the interpreter and older Triton take no such key)."""
    return {"launch_pdl": True} if pdl else {}


def _mode(pdl: bool) -> int:
    """The kernels' PDL constexpr (triton_wq.pdl_mode), trigger from $BITSMITH_PDL_TRIGGER (default late)."""
    import os
    return pdl_mode(pdl, os.environ.get("BITSMITH_PDL_TRIGGER", "late"))


def add_rmsnorm(x: torch.Tensor, r: torch.Tensor | None, norm: torch.nn.RMSNorm, pdl: bool = False) -> torch.Tensor:
    """x (B, D) contiguous, updated in place to x + r when r is given; returns RMSNorm(x)."""
    b, d = x.shape
    y = torch.empty_like(x)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    _add_rmsnorm_kernel[(b,)](x, r if r is not None else x, norm.weight, y, d, eps, HAS_R=r is not None,
                              BLOCK=triton.next_power_of_2(d), PDL=_mode(pdl), num_warps=8, **_launch(pdl))
    return y


def silu_mul(gu: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    b, f2 = gu.shape
    y = torch.empty(b, f2 // 2, device=gu.device, dtype=gu.dtype)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(f2 // 2, block))](gu, y, f2 // 2, BLOCK=block, PDL=_mode(pdl), num_warps=4,
                                                       **_launch(pdl))
    return y


def check(device: str = "cuda") -> dict:
    """Max relative deviations from the torch ops on random bf16 rows (both compute in fp32)."""
    import torch.nn.functional as F
    torch.set_grad_enabled(False)
    x = torch.randn(3, 4096, device=device, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    norm = torch.nn.RMSNorm(4096, device=device, dtype=torch.bfloat16)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    ref_x = x + r
    ref = norm(ref_x)
    xx = x.clone()
    y = add_rmsnorm(xx, r, norm)
    gu = torch.randn(3, 2 * 14336, device=device, dtype=torch.bfloat16)
    ref_sm = F.silu(gu[:, :14336]) * gu[:, 14336:]
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())   # noqa: E731
    out = {"residual": rel(xx, ref_x), "rmsnorm": rel(y, ref), "silu_mul": rel(silu_mul(gu), ref_sm)}
    out.update(check_attention(device))
    return out


def check_attention(device: str = "cuda", b: int = 2, heads: int = 32, kv: int = 8, length: int = 77,
                    hd: int = 128, dtype: torch.dtype = torch.bfloat16) -> dict:
    """decode_attention against SDPA on random data (a ragged last block), and that it wrote the cache.
    (Triton's CPU interpreter has no bf16 dot: check there with float32.)"""
    import torch.nn.functional as F
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)   # noqa: E731
    qkv = rnd(b, (heads + 2 * kv) * hd)
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
    kc, vc = rnd(b, kv, length, hd), rnd(b, kv, length, hd)
    pos = length - 1
    ref_k, ref_v = kc.clone(), vc.clone()
    ref_k[:, :, pos], ref_v[:, :, pos] = k.reshape(b, kv, hd), v.reshape(b, kv, hd)
    ref = F.scaled_dot_product_attention(q.reshape(b, heads, 1, hd).float(), ref_k.float(), ref_v.float(),
                                         enable_gqa=True).reshape(b, -1)
    out = decode_attention(q, k, v, kc, vc, pos, heads, block=32)
    rel = float((out.float() - ref).norm() / ref.norm())
    return {"attention": rel, "cache_written": bool(torch.equal(kc, ref_k) and torch.equal(vc, ref_v))}
