"""Weight-only integer Triton kernels (W4A16, W8A16): the pieces every kernel module shares, and the multi-row
CUDA-core GEMV.

The kernels live by job: triton_gemv1 (the one-launch M = 1 GEMVs on CUDA cores in fp32), triton_gemv_h2
(gemv1p, the M = 1 GEMV on packed half2 arithmetic and dispatch's M = 1 kernel), triton_gemm (the tensor-core
GEMM for M >= 2 and the dense dequantization for large M). This module holds what they share: integer -> float
code extraction (_code), a step's scales and zero points (_step_scales), the deterministic split-K hand-off
(_store_rows, _scratch), x in the codes' column order (stored_x), the Hopper checks and launches (TMA
descriptors, programmatic dependent launch), and

  gemv     small M: CUDA cores. Each program owns BLOCK_N output channels and walks K in tiles of whole
           groups (optionally split over SPLIT_K programs, summed with fp32 atomics). Per group it sums
           q * x in fp32 and applies scale and zero once: y += s * (sum q x - z * sum x).

All read the layout of layout.py (codes as int32 words, 32/bits codes per word, low bits first).
Integer -> float without the slow I2F instruction: a code masked in place at bit offset sh (< 23) OR-ed
into the exponent of 2^23 is the float 2^23 + q * 2^sh exactly; subtracting 2^23 gives q * 2^sh, and the
2^-sh is folded into x (gemv) or the scale (gemm). Codes above bit 23 are shifted down once per word.
Column order: gemv gathers x once into "x_pi" order (code i of word j of every row <-> x
position i * K/CPW + j, composed with the act-order permutation), so its x loads are contiguous; gemv1,
gemv1p, gemm and dequant read x where it lies (x[CPW * j + i]; gathered only under act-order) to save the
gather. The weights never move.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .layout import WQPack


@triton.jit
def _code(w, ws, i: tl.constexpr, BITS: tl.constexpr, HI: tl.constexpr):
    """Code i of each int32 word as float32 q * 2^sh (sh: see _code_inv_scale). `ws` = w >> HI."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if (i + 1) * BITS <= 23:
        m = (w & (MASK << (i * BITS))) | 0x4B000000
    else:
        m = (ws & (MASK << (i * BITS - HI))) | 0x4B000000
    return m.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _code_inv_scale(i: tl.constexpr, BITS: tl.constexpr, HI: tl.constexpr):
    if (i + 1) * BITS <= 23:
        sh: tl.constexpr = i * BITS
    else:
        sh: tl.constexpr = i * BITS - HI
    return 1.0 / (1 << sh)


@triton.jit
def _wq_gemv_kernel(X, QW, S, Z, B, Y, M, N, K, stride_xm, stride_ym,
                    BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS                 # codes per word
    WPG: tl.constexpr = GS // CPW                  # words per group
    HI: tl.constexpr = 12 if BITS == 4 else 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    wpr = K // CPW
    n_groups = K // GS
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rg = tl.arange(0, BLOCK_G)
    rw = tl.arange(0, WPG)
    nmask = rn < N
    mmask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, tl.cdiv(n_groups, BLOCK_G), SPLIT_K):
        g = (t0 + pid_k) * BLOCK_G + rg                                       # (BG,)
        gmask = g < n_groups
        word = g[:, None] * WPG + rw[None, :]                                 # (BG, WPG)
        w = tl.load(QW + rn[:, None, None] * wpr + word[None, :, :],
                    mask=nmask[:, None, None] & gmask[None, :, None], other=0)   # (BN, BG, WPG) int32
        ws = w >> HI
        part = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G, WPG), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_M, BLOCK_G, WPG), dtype=tl.float32)
        for i in tl.static_range(CPW):
            xi = tl.load(X + rm[:, None, None] * stride_xm + i * wpr + word[None, :, :],     # contiguous
                         mask=mmask[:, None, None] & gmask[None, :, None], other=0.0).to(tl.float32)
            xsum += xi
            q = _code(w, ws, i, BITS, HI)                                     # (BN, BG, WPG) q * 2^sh
            part += q[None, :, :, :] * (xi * _code_inv_scale(i, BITS, HI))[:, None, :, :]
        s = tl.load(S + g[None, :] * N + rn[:, None], mask=nmask[:, None] & gmask[None, :],
                    other=0.0).to(tl.float32)                                 # (BN, BG)
        if HAS_ZERO:
            z = tl.load(Z + g[None, :] * N + rn[:, None], mask=nmask[:, None] & gmask[None, :],
                        other=0.0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N, BLOCK_G), 1 << (BITS - 1), tl.float32)
        qx = tl.sum(part, axis=3)                                             # (BM, BN, BG)
        xg = tl.sum(xsum, axis=2)                                             # (BM, BG)
        acc += tl.sum(s[None, :, :] * (qx - z[None, :, :] * xg[:, None, :]), axis=2)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    out = Y + rm[:, None] * stride_ym + rn[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(Y.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(out, acc, mask=omask)


@triton.jit
def _store_rows(y, rn, nmask, B, Y, WS, CNT, N, pid_n, pid_k, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """y (BLOCK_N,) fp32 partial of rows rn -> Y. Split K without atomics on y: each program writes its
    partial to WS[pid_k], then bumps a counter per row block; the program that bumps it last sums the
    SPLIT_K partials in a fixed order (deterministic), writes y in the activation dtype, and resets the
    counter for the next call."""
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=nmask)
    else:
        tl.store(WS + pid_k * N + rn, y, mask=nmask)
        tl.debug_barrier()                       # every thread's partial is written before the release below
        done = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:                  # the last program of this row block reduces
            tot = tl.zeros_like(y)
            for kk in tl.static_range(SPLIT_K):
                tot += tl.load(WS + kk * N + rn, mask=nmask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)
            tl.store(Y + rn, tot.to(Y.dtype.element_ty), mask=nmask)
            tl.atomic_xchg(CNT + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _step_scales(S, Z, t, word, wmask, rn, nmask, N, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr):
    """fp32 scales and zero points of K step t's words for rows rn: (BLOCK_N, 1) when the step lies in one
    group (BLOCK_W <= words per group), else (BLOCK_N, BLOCK_W), one per word."""
    if BLOCK_W <= WPG:
        g = (t * BLOCK_W) // WPG
        if EVEN:
            s = tl.load(S + g * N + rn).to(tl.float32)[:, None]
        else:
            s = tl.load(S + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:
            if EVEN:
                z = tl.load(Z + g * N + rn).to(tl.float32)[:, None]
            else:
                z = tl.load(Z + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        else:
            z = tl.full((BLOCK_N, 1), 1 << (BITS - 1), tl.float32)
    else:
        g = word // WPG
        gm = nmask[:, None] & wmask[None, :]
        s = tl.load(S + g[None, :] * N + rn[:, None], mask=gm, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(Z + g[None, :] * N + rn[:, None], mask=gm, other=0.0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N, BLOCK_W), 1 << (BITS - 1), tl.float32)
    return s, z


# ---- launchers ---------------------------------------------------------------------------------------
def permute_x(x2: torch.Tensor, p: WQPack) -> torch.Tensor:
    """x in the kernels' column order: position i * K/CPW + j holds the column of code i of word j (after
    act-order). Code i of consecutive words then meets consecutive x, so every load of x is contiguous."""
    return x2.index_select(1, p.xidx)


def stored_x(x2: torch.Tensor, p: WQPack) -> torch.Tensor:
    """x in the codes' stored column order: x itself, gathered only under act-order (stored column j is
    original column perm[j])."""
    return x2 if p.perm is None else x2.index_select(1, p.perm)


def _operands(p: WQPack, bias: torch.Tensor | None):
    zero = p.zero if p.zero is not None else p.scale            # dummy pointers when absent
    return zero, bias if bias is not None else p.scale


def gemv(x2: torch.Tensor, p: WQPack, bias: torch.Tensor | None = None, *, block_n: int = 16,
         block_g: int = 2, split_k: int = 1, num_warps: int = 4) -> torch.Tensor:
    """(M, K) x (N, K)-quantized -> (M, N); the weights are read once per 8 rows of x, so small M."""
    m = x2.shape[0]
    xp = permute_x(x2, p)
    zero, b = _operands(p, bias)
    block_m = min(8, triton.next_power_of_2(m))                # rows of x per program (grid axis 2)
    block_g = min(block_g, triton.next_power_of_2(p.k // p.group))
    if split_k > 1:
        y = torch.zeros(m, p.n, device=x2.device, dtype=torch.float32)
    else:
        y = torch.empty(m, p.n, device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(p.n, block_n), split_k, triton.cdiv(m, block_m))
    _wq_gemv_kernel[grid](xp, p.qw, p.scale, zero, b, y, m, p.n, p.k, xp.stride(0), y.stride(0),
                          BITS=p.bits, GS=p.group, HAS_ZERO=p.zero is not None, HAS_BIAS=bias is not None,
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_G=block_g, SPLIT_K=split_k, num_warps=num_warps)
    return y if split_k == 1 else y.to(x2.dtype)


def _scratch(p: WQPack, key: tuple, shape: tuple, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pack fp32 split-K partials of `shape` and zeroed counters (one per output tile), made once: the
    kernels leave the counters at zero, so they are reused by every later call (and CUDA-graph replay)."""
    if key not in p.scratch:
        p.scratch[key] = (torch.empty(shape, device=p.qw.device, dtype=torch.float32),
                          torch.zeros(n_tiles, device=p.qw.device, dtype=torch.int32))
    return p.scratch[key]


def _hopper_reason(device: torch.device, feature: str) -> str | None:
    if torch.cuda.get_device_capability(device)[0] < 9:
        return f"{feature} needs compute capability 9.0 or newer"
    return None


@lru_cache(maxsize=None)
def pdl_reason(device: torch.device) -> str | None:
    """Why a kernel cannot be launched as a programmatic dependent launch here (None when it can): the
    grid dependency control instructions need Hopper (compute capability 9.0) or newer. Cached: asked per
    launch."""
    return _hopper_reason(device, "programmatic dependent launch")


def pdl_mode(pdl: bool, trigger: str = "late") -> int:
    """The PDL constexpr of kernels using _pdl_begin / _pdl_end: 0 = no PDL; 1 = the next kernel may be
    scheduled from this one's start; 2 = from the end of its main work ("late", the measured choice)."""
    if trigger not in ("start", "late"):
        raise ValueError(f"pdl trigger must be 'start' or 'late', not {trigger!r}")
    return 0 if not pdl else 1 if trigger == "start" else 2


@triton.jit
def _pdl_begin(PDL: tl.constexpr):
    """Programmatic dependent launch, at a kernel's start (pdl_mode): PDL = 1 lets the next kernel in the
    stream be scheduled now; PDL > 0 then waits until the kernel before has finished and its writes are
    visible. Nothing another kernel produces or reads may be touched before this."""
    if PDL == 1:
        gdc_launch_dependents()
    if PDL > 0:
        gdc_wait()


@triton.jit
def _pdl_end(PDL: tl.constexpr):
    """PDL = 2: the next kernel may be scheduled once this program's main work is done."""
    if PDL == 2:
        gdc_launch_dependents()


def steps_in_group(p: WQPack, block_w: int) -> bool:
    """Whether K steps of block_w words lie within one group of the pack (what scale_after needs)."""
    return block_w <= p.group // (32 // p.bits)


def tma_reason(x2: torch.Tensor, p: WQPack) -> str | None:
    """Why the copy-engine (TMA) launches cannot run (None when they can): a tensor map needs a Hopper or
    newer GPU, 16-byte aligned bases and row strides in multiples of 16 bytes."""
    why = _hopper_reason(p.qw.device, "TMA")
    if why is not None:
        return why
    if (p.qw.stride(0) * 4) % 16 or p.qw.data_ptr() % 16:
        return f"K={p.k} at {p.bits} bits gives word rows that are not a multiple of 16 bytes"
    if (p.k * x2.element_size()) % 16:
        return f"K={p.k} gives x rows that are not a multiple of 16 bytes"
    return None


def x_descriptor(x: torch.Tensor, rows: int, cols: int):
    """Host tensor map of x (rows, cols tiles); built per call (x moves), a few microseconds of host time."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(x, [rows, cols])


def words_descriptor(p: WQPack, rows: int, words: int):
    """Tensor map of the codes' words in (rows, words) tiles, made once per pack and tile shape."""
    key = (rows, words)
    if key not in p.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        p.tma[key] = TensorDescriptor.from_tensor(p.qw, [rows, words])
    return p.tma[key]
