"""W8A8 on the GPU: dynamic per-token activations times per-channel weights, int8 or FP8 e4m3.

int8: one Triton pass quantizes each row of x (absmax / 127, round half to even, as reference.py), then
either a Triton int8 tensor-core GEMM whose epilogue applies both scales and the bias (`int8_fused`), or
torch._int_mm (cuBLASLt) followed by a Triton epilogue pass (`int8_intmm`). FP8 e4m3: the same row
quantization to e4m3 (absmax / 448) and torch._scaled_mm with row-wise scales (Hopper's FP8 units).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import FP8_E4M3_MAX


@triton.jit
def _quant_rows_kernel(X, Q, S, K, stride_xm, QMAX: tl.constexpr, FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # bit-exact with reference.py: s = absmax * fp32(1 / QMAX) and an IEEE x / s (div_rn; Triton's `/` is
    # div.full.f32, up to 2 ulp off). A code one step off moves an output by up to w * absmax / 14 at the top
    # of the e4m3 grid, more than the tests' tolerance: such flips made the FP8 tests fail now and then
    s = tl.maximum(tl.max(amax, axis=0), 1e-12) * (1.0 / QMAX)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        if FP8:
            q = tl.math.div_rn(x, s).to(Q.dtype.element_ty)
        else:
            # round half to even (as torch.round) by the 1.5 * 2^23 trick: exact for |v| < 2^22
            v = tl.clamp(tl.math.div_rn(x, s), -QMAX, QMAX)
            q = ((v + 12582912.0) - 12582912.0).to(tl.int8)
        tl.store(Q + row * K + k0 + rk, q, mask=k0 + rk < K)
    tl.store(S + row, s)


def quantize_rows(x2: torch.Tensor, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> codes (M, K) int8 or float8_e4m3fn, scales (M,) float32."""
    m, k = x2.shape
    q = torch.empty(m, k, device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty(m, device=x2.device, dtype=torch.float32)
    _quant_rows_kernel[(m,)](x2, q, s, k, x2.stride(0), QMAX=FP8_E4M3_MAX if fp8 else 127.0, FP8=fp8,
                             BLOCK_K=min(4096, triton.next_power_of_2(k)), num_warps=8)
    return q, s


@triton.jit
def _int8_gemm_kernel(A, B, SA, SB, BIAS, Y, M, N, K, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """A (M, K) int8 row-major, B (N, K) int8 row-major; Y = (A B^T) * SA[:, None] * SB[None, :] + bias."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kmask = k0 + rk < K
        a = tl.load(A + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm < M)[:, None] & kmask[None, :], other=0)
        b = tl.load(B + rn[:, None] * K + (k0 + rk)[None, :], mask=(rn < N)[:, None] & kmask[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    sa = tl.load(SA + rm, mask=rm < M, other=0.0)
    sb = tl.load(SB + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], y.to(Y.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _int8_gemm_tma_kernel(a_desc, b_desc, SA, SB, BIAS, Y, M, N, K, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr):
    """The same product with Hopper's bulk tensor copies (TMA descriptors built on the host: one
    instruction per tile load, no per-thread address arithmetic) and a persistent grid of NUM_PROGS
    programs walking the output tiles in GROUP_M-row bands (L2 reuse of the B tiles); FLATTEN lets Triton
    pipeline across tile boundaries (its persistent-matmul pattern)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    width = GROUP_M * grid_n
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_PROGS, flatten=FLATTEN):
        first_m = (tile // width) * GROUP_M
        size_m = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % width) % size_m
        pid_n = (tile % width) // size_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kt in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        sa = tl.load(SA + rm, mask=rm < M, other=0.0)
        sb = tl.load(SB + rn, mask=rn < N, other=0.0).to(tl.float32)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * N + rn[None, :], y.to(Y.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _scale_epilogue_kernel(ACC, SA, SB, BIAS, Y, M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    msk = (rm < M)[:, None] & (rn < N)[None, :]
    acc = tl.load(ACC + rm[:, None] * N + rn[None, :], mask=msk, other=0)
    y = acc.to(tl.float32) * tl.load(SA + rm, mask=rm < M, other=0.0)[:, None] \
        * tl.load(SB + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], y.to(Y.dtype.element_ty), mask=msk)


def int8_fused(x2: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
               block_m: int | None = None, block_n: int | None = None, block_k: int = 128, group_m: int = 8,
               num_warps: int = 8, num_stages: int | None = None, tma: bool | None = None,
               persistent: int = 0, flatten: bool = False) -> torch.Tensor:
    """`tma`: the bulk-copy kernel (_int8_gemm_tma_kernel), on `persistent` programs (0: one per tile).
    Defaults: M >= 1024 (K % 16 == 0): TMA, 128x256x128 tiles, 4 stages, one program per tile - the H200
    sweep's winner at M = 2048 on both large shapes (764 / 771 us against 833 / 946 for the cp.async
    kernel's 256x128x128 x 3 stages, the H100 sweep's winner; sweep-w8a8.json). Smaller M: the cp.async
    kernel with 128x128x128 tiles, 4 stages (1.3-1.7x faster than bf16 at M = 16..64 on the H100)."""
    m, k = x2.shape
    if tma is None:
        tma = m >= 1024 and k % 16 == 0
    if block_m is None:
        block_m = 128 if tma or m < 1024 else 256
    if block_n is None:
        block_n = 256 if tma else 128
    if num_stages is None:
        num_stages = 3 if block_m == 256 else 4
    n = w8.shape[0]
    xq, sx = quantize_rows(x2)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if tma and k % 16 == 0:                     # TMA needs 16-byte row strides
        from triton.tools.tensor_descriptor import TensorDescriptor
        progs = min(tiles, persistent or tiles)
        _int8_gemm_tma_kernel[(progs,)](
            TensorDescriptor.from_tensor(xq, [block_m, block_k]),
            TensorDescriptor.from_tensor(w8, [block_n, block_k]),
            sx, w_scale, bias if bias is not None else w_scale, y, m, n, k, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, NUM_PROGS=progs,
            FLATTEN=bool(flatten and progs < tiles), num_warps=num_warps, num_stages=num_stages)
        return y
    _int8_gemm_kernel[(tiles,)](xq, w8, sx, w_scale, bias if bias is not None else w_scale, y, m, n, k,
                            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                            GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages)
    return y


def int8_intmm(x2: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch._int_mm needs M > 16 and K, N multiples of 8 (the dispatcher checks)."""
    m, _ = x2.shape
    n = w8.shape[0]
    xq, sx = quantize_rows(x2)
    acc = torch._int_mm(xq, w8.t())
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
    _scale_epilogue_kernel[grid](acc, sx, w_scale, bias if bias is not None else w_scale, y, m, n,
                                 HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128)
    return y


def fp8_scaled_mm(x2: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """w8 (N, K) float8_e4m3fn, w_scale (N,) float32; Hopper or newer; K, N multiples of 16."""
    xq, sx = quantize_rows(x2, fp8=True)
    y = torch._scaled_mm(xq, w8.t(), scale_a=sx.view(-1, 1), scale_b=w_scale.float().view(1, -1),
                         out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x2.dtype)
