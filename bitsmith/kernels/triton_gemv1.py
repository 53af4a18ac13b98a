"""One-launch M = 1 GEMVs on CUDA cores in fp32 (W4A16, W8A16), and the host set-up they share with gemv1p.

  gemv1    M = 1: one launch: x read in the weights' stored column order (no gather unless act-order),
           split K reduced by the last program of each row block (no memset, no cast pass). Dispatch's
           M = 1 kernel where gemv1p cannot run, and for 8-bit layers under 8M weights.
  gemv1h   M = 1, the same contract with fewer instructions per code (codes to fp32 through fp16 halves,
           _dqf); not faster on the H200, so only called directly (README).
m1_launch and the _m1_* helpers (a program's rows, K run and first words) also serve gemv1p
(triton_gemv_h2). Shared pieces (split-K hand-off, scales, x order) are in triton_wq.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .layout import WQPack
from .triton_wq import _code, _code_inv_scale, _operands, _scratch, _step_scales, _store_rows, stored_x


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


# ---- launchers ---------------------------------------------------------------------------------------
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
