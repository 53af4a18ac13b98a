"""Fused dequantize-matmul Triton kernels for weight-only integer quantization (W4A16, W8A16).

Five kernels over the layout of layout.py (codes as int32 words, 32/bits codes per word, low bits first):
  gemv1    M = 1: CUDA cores, one launch: x read in the weights' stored column order (no gather unless
           act-order), split K reduced by the last program of each row block (no memset, no cast pass).
  gemv1h   M = 1, the same contract with fewer instructions per code (codes to fp32 through fp16 halves,
           _dqf); not faster on the H200, so only called directly (README).
  gemv     small M: CUDA cores. Each program owns BLOCK_N output channels and walks K in tiles of whole
           groups (optionally split over SPLIT_K programs, summed with fp32 atomics). Per group it sums
           q * x in fp32 and applies scale and zero once: y += s * (sum q x - z * sum x).
  gemm     M >= 2: tensor cores, operands swapped (weights on the MMA's wide side, x on its narrow side),
           split K. Each K step dequantizes a (BLOCK_N, BLOCK_W) tile of words (4-bit: packed half-float
           instructions, _dq4_asm), interleaves the code positions in registers into stored column order
           and issues one dot against a contiguous x tile.
  dequant  writes the dense (N, K) weight in stored column order (gemm's dequantization, one contiguous
           store per row), for large M where cuBLAS on the dense weight wins.
gemv1p (triton_gemv_h2) and gemm can fetch their word tiles through Hopper's copy engine (TMA descriptors,
`tma=True`), which Triton pipelines num_stages deep; pointer loads that feed no dot are not pipelined.

Integer -> float without the slow I2F instruction: a code masked in place at bit offset sh (< 23) OR-ed
into the exponent of 2^23 is the float 2^23 + q * 2^sh exactly; subtracting 2^23 gives q * 2^sh, and the
2^-sh is folded into x (gemv) or the scale (gemm). Codes above bit 23 are shifted down once per word.
Column order: gemv gathers x once into "x_pi" order (code i of word j of every row <-> x
position i * K/CPW + j, composed with the act-order permutation), so its x loads are contiguous; gemv1,
gemm and dequant read x where it lies (x[CPW * j + i]; gathered only under act-order) to save the gather.
The weights never move.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

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
                    BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
def _x_codes(xt, CPW: tl.constexpr):
    """(BG, WPG, CPW) x in stored order -> the CPW (BG, WPG) slices, x_i = xt[:, :, i] (register splits)."""
    if CPW == 8:
        c0, c1 = tl.split(tl.reshape(xt, (xt.shape[0], xt.shape[1], 2, 2, 2)))       # i = 4a + 2b + c
        c0b0, c0b1 = tl.split(c0)
        c1b0, c1b1 = tl.split(c1)
        x0, x4 = tl.split(c0b0)
        x2, x6 = tl.split(c0b1)
        x1, x5 = tl.split(c1b0)
        x3, x7 = tl.split(c1b1)
        return x0, x1, x2, x3, x4, x5, x6, x7
    else:
        c0, c1 = tl.split(tl.reshape(xt, (xt.shape[0], xt.shape[1], 2, 2)))           # i = 2a + c
        x0, x2 = tl.split(c0)
        x1, x3 = tl.split(c1)
        return x0, x1, x2, x3


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


@triton.jit
def _wq_gemv1_kernel(X, QW, S, Z, B, Y, WS, CNT, N, K, BITS: tl.constexpr, GS: tl.constexpr,
                     HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    """M = 1: one launch, no copy of x. Program (pid_n, pid_k) owns BLOCK_N rows and a contiguous run of
    the row's groups (BLOCK_G whole groups per step, so each row streams BLOCK_G * GS / CPW contiguous
    words). x is read in STORED column order (code i of word j <-> x[CPW * j + i]; the caller permutes x
    only under act-order), from L1; the weights never move.
    Split K without atomics on y: each program writes its fp32 partial to WS[pid_k], then bumps a counter per
    row block; the program that bumps it last sums the SPLIT_K partials in a fixed order (deterministic),
    writes y in the activation dtype, and resets the counter for the next call."""
    CPW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GS // CPW
    HI: tl.constexpr = 12 if BITS == 4 else 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    wpr = K // CPW
    n_groups = K // GS
    steps = tl.cdiv(n_groups, BLOCK_G)
    per = tl.cdiv(steps, SPLIT_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rg = tl.arange(0, BLOCK_G)
    rw = tl.arange(0, WPG)
    nmask = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_G, WPG), dtype=tl.float32)
    for t in range(pid_k * per, tl.minimum(pid_k * per + per, steps)):
        g = t * BLOCK_G + rg                                                  # (BG,)
        gmask = g < n_groups
        word = g[:, None] * WPG + rw[None, :]                                 # (BG, WPG)
        w = tl.load(QW + rn[:, None, None] * wpr + word[None, :, :],
                    mask=nmask[:, None, None] & gmask[None, :, None], other=0,
                    eviction_policy="evict_first")                            # (BN, BG, WPG) int32, read once
        ws = w >> HI
        part = tl.zeros((BLOCK_N, BLOCK_G, WPG), dtype=tl.float32)
        # x of the step in one contiguous load, split into the CPW code positions in registers: CPW times
        # fewer load instructions than one strided load per position (measured 3-13% faster, README)
        xt = tl.load(X + word[:, :, None] * CPW + tl.arange(0, CPW)[None, None, :], mask=gmask[:, None, None],
                     other=0.0).to(tl.float32)                                # (BG, WPG, CPW)
        xsum = tl.sum(xt, axis=2)
        xs = _x_codes(xt, CPW)
        for i in tl.static_range(CPW):
            part += _code(w, ws, i, BITS, HI) * (xs[i] * _code_inv_scale(i, BITS, HI))[None, :, :]
        smask = nmask[:, None] & gmask[None, :]
        s = tl.load(S + g[None, :] * N + rn[:, None], mask=smask, other=0.0).to(tl.float32)   # (BN, BG)
        if HAS_ZERO:
            z = tl.load(Z + g[None, :] * N + rn[:, None], mask=smask, other=0.0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N, BLOCK_G), 1 << (BITS - 1), tl.float32)
        acc += s[:, :, None] * part - (s * z)[:, :, None] * xsum[None, :, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)                                   # (BN,)
    _store_rows(y, rn, nmask, B, Y, WS, CNT, N, pid_n, pid_k, HAS_BIAS, SPLIT_K)


def _dqf_ptx(bits: int) -> str:
    """PTX for _dqf: the codes of the word $CPW as float32 o_i + q, two codes per LOP3 (into the mantissas
    of a pair of fp16 o_i) and one fp16 -> fp32 conversion each (HADD2.F32, an FP-pipe instruction, where
    the fp32 route needs integer-pipe work per code). 4 bits: mask 0x000F000F takes codes (0, 4) into
    mantissa bits 0-3 of fp16 1024 (o = 1024), mask 0x00F000F0 codes (1, 5) into bits 4-7 of fp16 64
    (o = 64, one unit per 16 ulp); the word shifted by 8 gives (2, 6) and (3, 7) alike: one shift and 4 LOP3
    per 8 codes. 8 bits: bytes (0, 2) and, shifted by 8, (1, 3) into fp16 1024."""
    cpw = 32 // bits
    lines = [".reg .b32 u, t0, t1, t2, t3;", ".reg .b16 l0, l1, l2, l3, h0, h1, h2, h3;", f"shr.u32 u, ${cpw}, 8;"]
    if bits == 4:     # t0 = codes (0, 4), t1 = (1, 5) x16, t2 = (2, 6), t3 = (3, 7) x16
        srcs = [(f"${cpw}", "0x000F000F", "0x64006400"), (f"${cpw}", "0x00F000F0", "0x54005400"),
                ("u", "0x000F000F", "0x64006400"), ("u", "0x00F000F0", "0x54005400")]
        outs = [(0, 4), (1, 5), (2, 6), (3, 7)]
    else:             # t0 = codes (0, 2), t1 = (1, 3)
        srcs = [(f"${cpw}", "0x00FF00FF", "0x64006400"), ("u", "0x00FF00FF", "0x64006400")]
        outs = [(0, 2), (1, 3)]
    for j, (src, mask, magic) in enumerate(srcs):
        lines.append(f"lop3.b32 t{j}, {src}, {mask}, {magic}, 0xEA;")
        lines.append(f"mov.b32 {{l{j}, h{j}}}, t{j};")
        lines.append(f"cvt.f32.f16 ${outs[j][0]}, l{j};")
        lines.append(f"cvt.f32.f16 ${outs[j][1]}, h{j};")
    return "{\n" + "\n".join(lines) + "\n}"


_DQF4 = tl.constexpr(_dqf_ptx(4))
_DQF8 = tl.constexpr(_dqf_ptx(8))


@triton.jit
def _dqf(w, BITS: tl.constexpr):
    """Codes of each int32 word as float32 o_i + q (tuple, code order; o_i from _dqf_ptx: 1024, or 64 for
    the odd 4-bit codes)."""
    if BITS == 4:
        return tl.inline_asm_elementwise(_DQF4, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_DQF8, "=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 4, is_pure=True, pack=1)


@triton.jit
def _x1(b, wmask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(b).to(tl.float32)
    else:
        return tl.load(b, mask=wmask, other=0.0).to(tl.float32)


@triton.jit
def _x8(X, word, wmask, CPW: tl.constexpr, EVEN: tl.constexpr):
    """x at the CPW code positions of each word (x[CPW * word + i]), fp32 (tuple of CPW tensors)."""
    b = X + word * CPW
    if CPW == 8:
        return (_x1(b, wmask, EVEN), _x1(b + 1, wmask, EVEN), _x1(b + 2, wmask, EVEN), _x1(b + 3, wmask, EVEN),
                _x1(b + 4, wmask, EVEN), _x1(b + 5, wmask, EVEN), _x1(b + 6, wmask, EVEN), _x1(b + 7, wmask, EVEN))
    else:
        return (_x1(b, wmask, EVEN), _x1(b + 1, wmask, EVEN), _x1(b + 2, wmask, EVEN), _x1(b + 3, wmask, EVEN))


@triton.jit
def _m1_words(rows, word, nmask, wpr, EVEN: tl.constexpr):
    """A step's (BLOCK_N, BLOCK_W) words of the rows at `rows`, streamed once (evict first)."""
    if EVEN:
        return tl.load(rows + word[None, :], eviction_policy="evict_first")
    else:
        return tl.load(rows + word[None, :], mask=nmask[:, None] & (word < wpr)[None, :], other=0,
                       eviction_policy="evict_first")


@triton.jit
def _m1_run(wpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr):
    """Program (pid_n, pid_k) of the one-launch M = 1 GEMVs: its contiguous run [t0, t1) of the row's
    `steps` K steps of BLOCK_W words, and its BLOCK_N rows rn."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    steps = tl.cdiv(wpr, BLOCK_W)
    per = tl.cdiv(steps, SPLIT_K)
    t0 = pid_k * per
    t1 = tl.minimum(t0 + per, steps)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, pid_k, t0, t1, steps, rn


@triton.jit
def _m1_start(QW, N, wpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
              EVEN: tl.constexpr):
    """Program (pid_n, pid_k) of the one-launch M = 1 GEMVs (gemv1h, gemv1p): its BLOCK_N rows, its
    contiguous run [t0, t1) of K steps of BLOCK_W words, and the words of its first step (clamped to the
    last step: no predicate), loaded ahead as the loop loads each next step."""
    pid_n, pid_k, t0, t1, steps, rn = _m1_run(wpr, BLOCK_N, BLOCK_W, SPLIT_K)
    rw = tl.arange(0, BLOCK_W)
    nmask = rn < N
    rows = QW + rn[:, None] * wpr
    w = _m1_words(rows, tl.minimum(t0, steps - 1) * BLOCK_W + rw, nmask, wpr, EVEN)
    return pid_n, pid_k, t0, t1, rn, rw, nmask, rows, w


@triton.jit
def _wq_gemv1m_kernel(X, QW, S, Z, B, Y, WS, CNT, N, K, wpr, BITS: tl.constexpr, GS: tl.constexpr,
                      HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                      SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
    """M = 1 on CUDA cores, 3.7 instructions per 4-bit code against 6.0 for _wq_gemv1_kernel (main loops of
    both in their sm_90 SASS; the dequantization is _dqf: half a LOP3, one conversion and one FFMA per code).
    Not faster on the H200 for all that (74.3 vs 66.2 us on 28672x8192, README): neither is issue-bound, so
    dispatch keeps _wq_gemv1_kernel; kept, tested, as the lower-instruction base for the next try.
    Program (pid_n, pid_k) owns BLOCK_N rows and a contiguous run of K steps of BLOCK_W words; a flat
    (BLOCK_N, BLOCK_W) tile keeps each thread on 16-byte vectors of one row and several rows, so the x side
    of the work (loads, conversions, the offset sums) is shared by the rows a thread holds. The next step's
    words are loaded before this step's arithmetic (clamped to the program's last step: no predicate).
    EVEN: N % BLOCK_N == 0 and BLOCK_W divides K / CPW, so nothing is masked.
    Split K as _wq_gemv1_kernel (last program of a row block reduces, deterministic)."""
    CPW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GS // CPW
    pid_n, pid_k, t0, t1, rn, rw, nmask, rows, w = _m1_start(QW, N, wpr, BLOCK_N, BLOCK_W, SPLIT_K, EVEN)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    ACCW: tl.constexpr = 1 if BLOCK_W <= WPG else BLOCK_W
    accc = tl.zeros((BLOCK_N, ACCW), dtype=tl.float32)                        # offsets + zero points
    for t in range(t0, t1):
        word = t * BLOCK_W + rw
        wmask = word < wpr
        wn = _m1_words(rows, tl.minimum(t + 1, t1 - 1) * BLOCK_W + rw, nmask, wpr, EVEN)   # next step, ahead
        s, z = _step_scales(S, Z, t, word, wmask, rn, nmask, N, BITS, HAS_ZERO, BLOCK_N, BLOCK_W, WPG, EVEN)
        xs = _x8(X, word, wmask, CPW, EVEN)
        c = _dqf(w, BITS)
        part = c[0] * xs[0][None, :]
        for i in tl.static_range(1, CPW):
            part += c[i] * xs[i][None, :]
        # sum v x = sum q x + sum o_i x_i: the offsets come off with the zero point, once per row and step,
        # from the step's sums of x over the codes with o = 1024 (xa) and o = 64 (xb; 4 bits)
        # (per word when a step spans several groups)
        if BITS == 4:
            xa = xs[0] + xs[2] + xs[4] + xs[6]
            xb = xs[1] + xs[3] + xs[5] + xs[7]
            if BLOCK_W <= WPG:
                corr = (1024.0 + z) * tl.sum(xa, axis=0) + (64.0 + z) * tl.sum(xb, axis=0)
            else:
                corr = (1024.0 + z) * xa[None, :] + (64.0 + z) * xb[None, :]
        else:
            xa = xs[0] + xs[1] + xs[2] + xs[3]
            if BLOCK_W <= WPG:
                corr = (1024.0 + z) * tl.sum(xa, axis=0)
            else:
                corr = (1024.0 + z) * xa[None, :]
        acc += s * part
        accc += s * corr
        w = wn
    y = tl.sum(acc, axis=1) - tl.sum(accc, axis=1)                            # (BN,)
    _store_rows(y, rn, nmask, B, Y, WS, CNT, N, pid_n, pid_k, HAS_BIAS, SPLIT_K)


def _dq4_ptx(ty: str, magic: str, scaled: bool = True) -> str:
    """PTX for _dq4_asm: code pairs (i, i + 4) of the word $8 into the two halves of t_i, each half
    2^m + q exactly (LOP3 of the masked pair into the mantissas of 2^m, `magic`); one packed FMA subtracts
    2^m + z (exact: integers), one multiplies by s. $9 = s, $10 = -(2^m + z), in the 16-bit type.
    scaled=False (_dq4q_asm): no multiply, the exact q - z; $9 = -(2^m + z)."""
    rz = "$10" if scaled else "$9"
    lines = [".reg .b32 t0, t1, t2, t3, rs, rz, one, nz;", f"mov.b32 rz, {{{rz}, {rz}}};",
             f"mov.b32 one, {'0x3F803F80' if ty == 'bf16' else '0x3C003C00'};", "mov.b32 nz, 0x80008000;"]
    if scaled:
        lines.append("mov.b32 rs, {$9, $9};")
    for i in range(4):
        src = "$8" if i == 0 else f"t{i}"
        if i:
            lines.append(f"shr.u32 t{i}, $8, {4 * i};")
        lines.append(f"lop3.b32 t{i}, {src}, 0x000F000F, {magic}, 0xEA;")
    lines += [f"fma.rn.{ty}x2 t{i}, t{i}, one, rz;" for i in range(4)]
    if scaled:
        lines += [f"fma.rn.{ty}x2 t{i}, t{i}, rs, nz;" for i in range(4)]
    lines += [f"mov.b32 {{${i}, ${i + 4}}}, t{i};" for i in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


_DQ4_BF16 = tl.constexpr(_dq4_ptx("bf16", "0x43004300"))     # bf16 128 + q
_DQ4_FP16 = tl.constexpr(_dq4_ptx("f16", "0x64006400"))     # fp16 1024 + q
_DQ4Q_BF16 = tl.constexpr(_dq4_ptx("bf16", "0x43004300", scaled=False))
_DQ4Q_FP16 = tl.constexpr(_dq4_ptx("f16", "0x64006400", scaled=False))


@triton.jit
def _dq4_asm(w, s, mz, FP16: tl.constexpr):
    """The 8 4-bit codes of each int32 word as (q - z) * s in the activation dtype, two codes per packed
    instruction (see _dq4_ptx): ~1.6 instructions per code instead of ~4 for the fp32 path plus the cast
    (Marlin / FasterTransformer's trick). q - z is exact, so the only roundings are s to 16 bits and the
    product, as for a 16-bit weight. Integer zero points only. s and mz = -(2^m + z) broadcast to w's
    shape, in the output dtype (2^m = 1024 for fp16, 128 for bf16)."""
    if FP16:
        return tl.inline_asm_elementwise(_DQ4_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [w, s, mz],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_DQ4_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [w, s, mz],
                                         dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)


@triton.jit
def _dq4q_asm(w, mz, FP16: tl.constexpr):
    """_dq4_asm without the scale: the exact integers q - z (|q - z| <= 15) in the activation dtype."""
    if FP16:
        return tl.inline_asm_elementwise(_DQ4Q_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [w, mz],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_DQ4Q_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [w, mz],
                                         dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)


@triton.jit
def _codes_f(w, s, zs, BITS: tl.constexpr, HI: tl.constexpr, dt: tl.constexpr):
    """The CPW codes of each word as (q - z) * s in dtype dt, by the fp32 path (tuple of CPW tensors)."""
    ws = w >> HI
    if BITS == 4:
        return ((_code(w, ws, 0, BITS, HI) * (s * _code_inv_scale(0, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 1, BITS, HI) * (s * _code_inv_scale(1, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 2, BITS, HI) * (s * _code_inv_scale(2, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 3, BITS, HI) * (s * _code_inv_scale(3, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 4, BITS, HI) * (s * _code_inv_scale(4, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 5, BITS, HI) * (s * _code_inv_scale(5, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 6, BITS, HI) * (s * _code_inv_scale(6, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 7, BITS, HI) * (s * _code_inv_scale(7, BITS, HI)) - zs).to(dt))
    else:
        return ((_code(w, ws, 0, BITS, HI) * (s * _code_inv_scale(0, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 1, BITS, HI) * (s * _code_inv_scale(1, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 2, BITS, HI) * (s * _code_inv_scale(2, BITS, HI)) - zs).to(dt),
                (_code(w, ws, 3, BITS, HI) * (s * _code_inv_scale(3, BITS, HI)) - zs).to(dt))


@triton.jit
def _interleave(c, CPW: tl.constexpr):
    """CPW (BN, BW) tiles -> (BN, BW, 2, .., 2) whose flattened last dims give code i at position
    CPW * word + i (tl.join appends the innermost axis, so the last join picks the lowest bit of i)."""
    if CPW == 8:
        return tl.join(tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6])),
                       tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7])))
    else:
        return tl.join(tl.join(c[0], c[2]), tl.join(c[1], c[3]))


@triton.jit
def _dq_tile(w, s, z, BITS: tl.constexpr, ASM: tl.constexpr, FP16: tl.constexpr, SCALED: tl.constexpr,
             dt: tl.constexpr):
    """A (BLOCK_N, BLOCK_W) tile of words -> the (BLOCK_N, BLOCK_W * CPW) weights in stored column order
    (CPW * word + i), in dtype dt: (q - z) * s, or the exact q - z when not SCALED. ASM: 4-bit codes with
    integer zero points by packed half-float instructions (_dq4_asm); else the fp32 path (_codes_f).
    s, z: fp32, (BLOCK_N, 1) or (BLOCK_N, BLOCK_W) (_step_scales)."""
    CPW: tl.constexpr = 32 // BITS
    HI: tl.constexpr = 12 if BITS == 4 else 16
    if ASM:
        mz = tl.broadcast_to((-(z + (1024.0 if FP16 else 128.0))).to(dt), w.shape)
        if SCALED:
            c = _dq4_asm(w, tl.broadcast_to(s.to(dt), w.shape), mz, FP16)
        else:
            c = _dq4q_asm(w, mz, FP16)
    elif SCALED:
        c = _codes_f(w, s, z * s, BITS, HI, dt)
    else:
        c = _codes_f(w, tl.full(s.shape, 1.0, tl.float32), z, BITS, HI, dt)
    return tl.reshape(_interleave(c, CPW), (w.shape[0], w.shape[1] * CPW))


@triton.jit
def _wq_gemm_kernel(X, QW, S, Z, B, Y, WS, CNT, M, N, K, wpr, stride_xm, stride_ym,
                      BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
                      ASM: tl.constexpr, EVEN: tl.constexpr, FP16: tl.constexpr, TMA: tl.constexpr = False,
                      SCALE_AFTER: tl.constexpr = False):
    """Tensor-core GEMM with the operands swapped: acc (BLOCK_N, BLOCK_M) = W tile x x^T, so the weights fill
    the MMA's M side (64 rows per warpgroup on Hopper) and a few rows of x are its narrow N side (M = 1..16
    costs about the same). The dequantized weights stay in registers as the MMA's A operand (Triton keeps
    them there: no shared-memory round trip of 16-bit weights). K is split over SPLIT_K programs (small N
    or long K); the last program of each tile sums the fp32 partials in a fixed order (as
    _wq_gemv1_kernel). `wpr` (K / CPW) is an argument so Triton sees its divisibility: without it the
    loads lost their 16-byte vectors and the x tiles their cp.async pipelining (measured 1.3-1.8x slower).
    TMA: X and QW are host tensor descriptors (x tile (BLOCK_M, BLOCK_W * CPW), word tile (BLOCK_N, BLOCK_W));
    the copy engine fetches both, zero-filling past the edges, so Triton's pipeline keeps num_stages word
    tiles in flight through shared memory (the pointer loads of the words feed no dot directly, so they
    are not pipelined: one step's latency per step).
    SCALE_AFTER (steps within one group only): the weights enter the dot as the exact q - z and the step's
    fp32 product is scaled per row afterwards, on the accumulator: no packed multiply per code pair (SASS
    of the K loop compiled offline: 4.1 instead of 5.6 instructions per code at M = 16; faster on some
    launches only, gemm_config)."""
    CPW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GS // CPW
    pid_m = tl.program_id(0)                     # fastest: programs sharing a weight tile run together (L2)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    steps = tl.cdiv(wpr, BLOCK_W)
    per = tl.cdiv(steps, SPLIT_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rw = tl.arange(0, BLOCK_W)
    nmask = rn < N
    mmask = rm < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(pid_k * per, tl.minimum(pid_k * per + per, steps)):
        word = t * BLOCK_W + rw
        wmask = word < wpr
        if TMA:
            w = QW.load([pid_n * BLOCK_N, t * BLOCK_W])
        elif EVEN:
            w = tl.load(QW + rn[:, None] * wpr + word[None, :])
        else:
            w = tl.load(QW + rn[:, None] * wpr + word[None, :], mask=nmask[:, None] & wmask[None, :], other=0)
        s, z = _step_scales(S, Z, t, word, wmask, rn, nmask, N, BITS, HAS_ZERO, BLOCK_N, BLOCK_W, WPG, EVEN)
        # one dot over all BLOCK_W * CPW codes of the step, x in stored column order (CPW * word + i): one
        # wide MMA chain and one contiguous x tile per step instead of CPW narrow dots over a gathered x
        # (measured ~15% faster on an H200 at M = 16, README)
        wt = _dq_tile(w, s, z, BITS, ASM, FP16, not SCALE_AFTER, Y.dtype.element_ty)
        if TMA:
            xt = X.load([pid_m * BLOCK_M, t * (BLOCK_W * CPW)])
        else:
            xk = t * (BLOCK_W * CPW) + tl.arange(0, BLOCK_W * CPW)
            xt = tl.load(X + rm[:, None] * stride_xm + xk[None, :], mask=mmask[:, None] & (xk < K)[None, :],
                         other=0.0)
        if SCALE_AFTER:
            acc += tl.dot(wt, tl.trans(xt)) * s
        else:
            acc = tl.dot(wt, tl.trans(xt), acc)
    omask = nmask[:, None] & mmask[None, :]
    out = rm[None, :] * stride_ym + rn[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        tl.store(Y + out, acc.to(Y.dtype.element_ty), mask=omask)
    else:
        tile = pid_n * tl.num_programs(0) + pid_m
        part = rm[None, :] * N + rn[:, None]
        tl.store(WS + pid_k * M * N + part, acc, mask=omask)
        tl.debug_barrier()
        done = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            tot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for kk in tl.static_range(SPLIT_K):
                tot += tl.load(WS + kk * M * N + part, mask=omask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
            tl.store(Y + out, tot.to(Y.dtype.element_ty), mask=omask)
            tl.atomic_xchg(CNT + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _wq_dequant_s_kernel(QW, S, Z, W, N, K, wpr, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, ASM: tl.constexpr, FP16: tl.constexpr):
    """W (N, K) in STORED column order (code i of word j at column CPW * j + i), the gemm's dequantization
    (packed half-float instructions at 4 bits) and one contiguous store of BLOCK_W * CPW columns per row:
    the matmul then reads x where it lies (gathered only under act-order)."""
    CPW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GS // CPW
    t = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word = t * BLOCK_W + tl.arange(0, BLOCK_W)
    nmask = rn < N
    wmask = word < wpr
    w = tl.load(QW + rn[:, None] * wpr + word[None, :], mask=nmask[:, None] & wmask[None, :], other=0)
    s, z = _step_scales(S, Z, t, word, wmask, rn, nmask, N, BITS, HAS_ZERO, BLOCK_N, BLOCK_W, WPG, False)
    wt = _dq_tile(w, s, z, BITS, ASM, FP16, True, W.dtype.element_ty)
    col = t * (BLOCK_W * CPW) + tl.arange(0, BLOCK_W * CPW)
    tl.store(W + rn[:, None] * K + col[None, :], wt, mask=nmask[:, None] & (col < K)[None, :])


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


def gemv1(x2: torch.Tensor, p: WQPack, bias: torch.Tensor | None = None, *, block_n: int = 32,
          block_g: int = 2, split_k: int = 1, num_warps: int = 4) -> torch.Tensor:
    """M = 1 only: the one-launch GEMV (x in stored column order; permuted only under act-order)."""
    x = stored_x(x2, p)
    zero, b = _operands(p, bias)
    block_g = min(block_g, triton.next_power_of_2(p.k // p.group))
    y = torch.empty(1, p.n, device=x2.device, dtype=x2.dtype)
    n_blocks = triton.cdiv(p.n, block_n)
    ws, cnt = _scratch(p, (split_k, n_blocks), (split_k, p.n), n_blocks) if split_k > 1 else (y, y)
    _wq_gemv1_kernel[(n_blocks, split_k)](x, p.qw, p.scale, zero, b, y, ws, cnt, p.n, p.k, BITS=p.bits,
                                          GS=p.group, HAS_ZERO=p.zero is not None, HAS_BIAS=bias is not None,
                                          BLOCK_N=block_n, BLOCK_G=block_g, SPLIT_K=split_k, num_warps=num_warps)
    return y


def gemv1h(x2: torch.Tensor, p: WQPack, bias: torch.Tensor | None = None, *, block_n: int = 256,
           block_w: int | None = None, split_k: int = 1, num_warps: int = 4) -> torch.Tensor:
    """M = 1 only: the half-conversion GEMV (_wq_gemv1m_kernel); x in stored column order (permuted only
    under act-order). block_w: words per K step (default: 16 at 4 bits, 32 at 8; one g128 group)."""
    L = m1_launch(x2, p, bias, "h", block_n, block_w, split_k)
    _wq_gemv1m_kernel[(L.n_blocks, L.split_k)](L.x, p.qw, p.scale, L.zero, L.b, L.y, L.ws, L.cnt, p.n, p.k, L.wpr,
                                               BITS=p.bits, GS=p.group, HAS_ZERO=p.zero is not None,
                                               HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_W=L.block_w,
                                               SPLIT_K=L.split_k, EVEN=L.even, num_warps=num_warps)
    return L.y


class M1Launch(NamedTuple):
    x: torch.Tensor              # x in stored column order, contiguous
    zero: torch.Tensor           # zero points, or a dummy pointer
    b: torch.Tensor              # bias, or a dummy pointer
    y: torch.Tensor              # (1, N) output
    ws: torch.Tensor             # split-K partials (y when not split)
    cnt: torch.Tensor            # split-K counters (y when not split)
    wpr: int                     # words per row
    block_w: int
    split_k: int
    n_blocks: int
    even: bool                   # nothing to mask: N % block_n == 0 and block_w divides the row


def m1_launch(x2: torch.Tensor, p: WQPack, bias: torch.Tensor | None, tag: str, block_n: int,
              block_w: int | None, split_k: int, min_block_w: int = 1) -> M1Launch:
    """The host set-up shared by the one-launch M = 1 GEMVs (gemv1h here, gemv1p in triton_gemv_h2): x in
    stored column order (gathered only under act-order), the K step (default one g128 group: 16 words at
    4 bits, 32 at 8) and split clamped to the row, the output, the split-K scratch (kept per kernel `tag`)."""
    x = stored_x(x2, p)
    if not x.is_contiguous():
        x = x.contiguous()
    zero, b = _operands(p, bias)
    wpr = p.k * p.bits // 32
    if block_w is None:
        block_w = 16 if p.bits == 4 else 32
    block_w = max(min_block_w, min(block_w, triton.next_power_of_2(wpr)))
    split_k = max(1, min(split_k, triton.cdiv(wpr, block_w)))
    y = torch.empty(1, p.n, device=x2.device, dtype=x2.dtype)
    n_blocks = triton.cdiv(p.n, block_n)
    ws, cnt = _scratch(p, (tag, split_k, n_blocks), (split_k, p.n), n_blocks) if split_k > 1 else (y, y)
    return M1Launch(x, zero, b, y, ws, cnt, wpr, block_w, split_k, n_blocks,
                    p.n % block_n == 0 and wpr % block_w == 0)


def _scratch(p: WQPack, key: tuple, shape: tuple, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pack fp32 split-K partials of `shape` and zeroed counters (one per output tile), made once: the
    kernels leave the counters at zero, so they are reused by every later call (and CUDA-graph replay)."""
    if key not in p.scratch:
        p.scratch[key] = (torch.empty(shape, device=p.qw.device, dtype=torch.float32),
                          torch.zeros(n_tiles, device=p.qw.device, dtype=torch.int32))
    return p.scratch[key]


def gemm(x2: torch.Tensor, p: WQPack, bias: torch.Tensor | None = None, *, block_m: int | None = None,
         block_n: int = 128, block_w: int | None = None, split_k: int = 1, num_warps: int = 4,
         num_stages: int = 3, asm: bool = True, tma: bool = False, scale_after: bool = False) -> torch.Tensor:
    """`asm`: 4-bit codes with integer zero points dequantized by packed half-float instructions
    (_dq4_asm); 8-bit codes, fractional zeros and asm=False take the fp32 path. x is read in the weights'
    stored column order (gathered only under act-order). `tma`: x and the words through the copy engine
    (tma_reason says where it cannot). `scale_after`: scales applied to each step's product instead of to
    every code (K steps must lie within one group, steps_in_group; gemm_config says where it is faster)."""
    m = x2.shape[0]
    xp = stored_x(x2, p)
    if tma and not xp.is_contiguous():
        xp = xp.contiguous()
    zero, b = _operands(p, bias)
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if block_w is None:
        block_w = 16 if p.bits == 4 else 32
    cpw = 32 // p.bits
    if scale_after and not steps_in_group(p, block_w):
        raise ValueError(f"gemm: scale_after needs K steps within one group ({block_w} words per step, "
                         f"{p.group // cpw} per group); use block_w <= {p.group // cpw}")
    m_blocks, n_blocks = triton.cdiv(m, block_m), triton.cdiv(p.n, block_n)
    split_k = max(1, min(split_k, triton.cdiv(p.k // cpw, block_w)))
    y = torch.empty(m, p.n, device=x2.device, dtype=x2.dtype)
    ws, cnt = _scratch(p, ("gemm", split_k, m_blocks * n_blocks, m), (split_k * m, p.n), m_blocks * n_blocks) \
        if split_k > 1 else (y, y)
    even = p.n % block_n == 0 and (p.k // cpw) % block_w == 0
    xa, qa = xp, p.qw
    if tma:
        xa, qa = x_descriptor(xp, block_m, block_w * cpw), words_descriptor(p, block_n, block_w)
    _wq_gemm_kernel[(m_blocks, n_blocks, split_k)](
        xa, qa, p.scale, zero, b, y, ws, cnt, m, p.n, p.k, p.k // cpw, xp.stride(0), y.stride(0),
        BITS=p.bits, GS=p.group, HAS_ZERO=p.zero is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split_k, ASM=asm and p.bits == 4 and p.int_zero, EVEN=even,
        FP16=x2.dtype == torch.float16, TMA=tma, SCALE_AFTER=scale_after, num_warps=num_warps,
        num_stages=num_stages)
    return y


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


def dequantize_stored(p: WQPack, dtype: torch.dtype, *, block_n: int = 32, block_w: int | None = None,
                      num_warps: int = 4) -> torch.Tensor:
    """Dense (N, K) weight with columns in stored order (the act-order permutation not undone)."""
    w = torch.empty(p.n, p.k, device=p.qw.device, dtype=dtype)
    wpr = p.k * p.bits // 32
    if block_w is None:
        block_w = 16 if p.bits == 4 else 32
    block_w = min(block_w, triton.next_power_of_2(wpr))
    asm = p.bits == 4 and p.int_zero and dtype in (torch.float16, torch.bfloat16)
    grid = (triton.cdiv(p.n, block_n), triton.cdiv(wpr, block_w))
    _wq_dequant_s_kernel[grid](p.qw, p.scale, p.zero if p.zero is not None else p.scale, w, p.n, p.k, wpr,
                               BITS=p.bits, GS=p.group, HAS_ZERO=p.zero is not None, BLOCK_N=block_n,
                               BLOCK_W=block_w, ASM=asm, FP16=dtype == torch.float16, num_warps=num_warps)
    return w


def dequant_matmul(x2: torch.Tensor, p: WQPack, bias: torch.Tensor | None = None, **cfg) -> torch.Tensor:
    """Large M: the dense weight in stored column order, then cuBLAS on x (gathered only under act-order).
    Against the earlier x_pi-order dequantization (fp32 per code, CPW strided stores, x gathered every
    call): 5-30% faster on the issue shapes at M = 16-2048 (sweep-tma.json)."""
    x = stored_x(x2, p)
    return torch.nn.functional.linear(x, dequantize_stored(p, x2.dtype, **cfg), bias)


def dequantize(p: WQPack, dtype: torch.dtype) -> torch.Tensor:
    """Dense (N, K) weight in the original column order (for inspection; the matmul stays in stored order)."""
    w = dequantize_stored(p, dtype)
    return w if p.perm is None else torch.empty_like(w).index_copy_(1, p.perm.long(), w)
