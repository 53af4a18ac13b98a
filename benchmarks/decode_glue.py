"""Fused elementwise glue for the GPU decode benchmark's `glue` variant (benchmarks/decode_gpu.py): one
launch for "residual add + RMSNorm" and one for "SiLU(gate) * up", where the plain model launches several
small kernels each. bf16 and the quantized models use the same glue, so it changes what the linears' share
of a step is, not how they are timed. Checked against the torch ops in `check()` (run by decode_gpu).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(X, R, W, Y, D, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr):
    """Row-wise: x += r (written back, the residual stream), y = x / rms(x) * w."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    msk = c < D
    x = tl.load(X + row * D + c, mask=msk, other=0.0).to(tl.float32)
    if HAS_R:
        x += tl.load(R + row * D + c, mask=msk, other=0.0).to(tl.float32)
        tl.store(X + row * D + c, x.to(X.dtype.element_ty), mask=msk)
        x = x.to(X.dtype.element_ty).to(tl.float32)          # normalize what the residual stream holds
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(W + c, mask=msk, other=0.0).to(tl.float32)
    tl.store(Y + row * D + c, (x * inv * w).to(Y.dtype.element_ty), mask=msk)


@triton.jit
def _silu_mul_kernel(GU, Y, F, BLOCK: tl.constexpr):
    """GU (B, 2F) = [gate | up] -> Y (B, F) = silu(gate) * up."""
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = c < F
    g = tl.load(GU + row * 2 * F + c, mask=msk, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * F + F + c, mask=msk, other=0.0).to(tl.float32)
    tl.store(Y + row * F + c, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=msk)


def add_rmsnorm(x: torch.Tensor, r: torch.Tensor | None, norm: torch.nn.RMSNorm) -> torch.Tensor:
    """x (B, D) contiguous, updated in place to x + r when r is given; returns RMSNorm(x)."""
    b, d = x.shape
    y = torch.empty_like(x)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    _add_rmsnorm_kernel[(b,)](x, r if r is not None else x, norm.weight, y, d, eps, HAS_R=r is not None,
                              BLOCK=triton.next_power_of_2(d), num_warps=8)
    return y


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    b, f2 = gu.shape
    y = torch.empty(b, f2 // 2, device=gu.device, dtype=gu.dtype)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(f2 // 2, block))](gu, y, f2 // 2, BLOCK=block, num_warps=4)
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
    return {"residual": rel(xx, ref_x), "rmsnorm": rel(y, ref), "silu_mul": rel(silu_mul(gu), ref_sm)}
