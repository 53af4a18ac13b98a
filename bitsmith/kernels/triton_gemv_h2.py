"""M = 1 weight-only GEMV on packed half2 arithmetic (`gemv1p`, kernel `_wq_gemv1p_kernel`).

Why: the CUDA-core GEMVs of triton_gemv1.py issue 3.7 (gemv1h) to 6.0 (gemv1) instructions per 4-bit code, and
at the H200's 4.8 TB/s a 132-SM chip must consume ~33 codes per cycle per SM: 3.7 instructions per code is
the whole issue rate of an SM (4 x 32 lanes), so they are issue-bound (ncu: README), far from the bandwidth
floor. Here two codes share each instruction:
  codes -> half2: one LOP3 puts a pair of 4-bit codes into the mantissas of a pair of fp16 1024s (or 64s for
           the odd codes), one HSUB2 takes 1024 + z (64 + z) off: exact small integers q - z;
  multiply-add: HFMA2 with x in half2, accumulated over the 32 codes of 4 words (16 per half) in fp16, then
           converted to fp32 once per 4 words and scaled there (fp32 accumulation across units and steps).
That is ~1.7 instructions per code in the main loop (SASS, README) instead of 3.7.

Numerics: products of exact integers |q - z| <= 15 (255 at 8 bits) with x rounded to fp16, summed in fp16
over at most 16 (8) terms: relative error ~2^-11 per 4-word partial, far inside the tests' bounds. So that
these sums can neither overflow fp16 nor lose x to its subnormals, x is scaled per 4-word unit by a power of
two 2^e (exact) such that the unit's max |x| lands in [128, 256) (4 bits; [16, 32) at 8 bits: 16 x 15 x 256
and 8 x 255 x 32 stay under 65504), and 2^-e is applied in fp32. bf16 x is scaled in bf16 (exact) before the
conversion to fp16, so bf16's range is kept. Integer zero points only (1024 + z must be exact in fp16);
K must fill whole 4-word units (K % 32 at 4 bits, % 16 at 8) and groups must span whole units.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import HALF2_UNIT as U  # words per unit: one fp16 partial sum, one x scale
from .layout import WQPack, gemv1p_reason
from .triton_gemv1 import _m1_run, _m1_start, _m1_words, m1_launch
from .triton_wq import _pdl_begin, _pdl_end, _store_rows, pdl_mode, pdl_reason, words_descriptor


def _xprep_ptx(bits: int, fp16: bool) -> str:
    """PTX: a unit's raw x (U * CPW / 2 int32 = pairs of 16-bit x, in memory order) -> its half2 operand pairs
    (word j, pair i) = (x[CPW j + i], x[CPW j + i + CPW / 2]) scaled by 2^e, and 2^-e as fp32 (last
    output)."""
    cpw = 32 // bits
    half = cpw // 2
    n_raw = U * cpw // 2
    n_out = U * half
    xe = 8 if bits == 4 else 5                   # scaled max |x| in [2^(xe - 1), 2^xe)
    r = [f"${n_out + 1 + i}" for i in range(n_raw)]
    lines = [f".reg .b32 a<{n_raw}>, v<{n_raw}>, m, t, e, ff, sc;", ".reg .f32 fa, fb;"]
    lines += [f"and.b32 a{i}, {r[i]}, 0x7FFF7FFF;" for i in range(n_raw)]
    mx = "max.f16x2" if fp16 else "max.bf16x2"
    lines.append(f"{mx} m, a0, a1;")
    lines += [f"{mx} m, m, a{i};" for i in range(2, n_raw)]
    lines += ["shr.u32 t, m, 16;", "and.b32 e, m, 0xFFFF;", "max.u32 e, e, t;"]
    if fp16:          # fp16 exponent field: bits 10-14, bias 15; scale 2^(ff - 15), ff in [1, 29]
        lines += ["shr.u32 e, e, 10;", f"sub.s32 ff, {xe + 29}, e;", "max.s32 ff, ff, 1;",
                  "min.s32 ff, ff, 29;",
                  "shl.b32 t, ff, 10;", "shl.b32 sc, ff, 26;", "or.b32 sc, sc, t;",
                  "sub.s32 t, 142, ff;", f"shl.b32 ${n_out}, t, 23;"]
        lines += [f"mul.rn.f16x2 v{i}, {r[i]}, sc;" for i in range(n_raw)]
    else:             # bf16 (= fp32) exponent field: bits 7-14, bias 127; scale 2^(ff - 127), ff in [1, 253]
        lines += ["shr.u32 e, e, 7;", f"sub.s32 ff, {xe + 253}, e;", "max.s32 ff, ff, 1;",
                  "min.s32 ff, ff, 253;",
                  "shl.b32 t, ff, 7;", "shl.b32 sc, ff, 23;", "or.b32 sc, sc, t;",
                  "sub.s32 t, 254, ff;", f"shl.b32 ${n_out}, t, 23;"]
        lines += [f"mul.rn.bf16x2 v{i}, {r[i]}, sc;" for i in range(n_raw)]
    for j in range(U):
        for i in range(half):
            pa, pb = cpw * j + i, cpw * j + i + half            # x positions in the unit: low, high half
            out = f"${j * half + i}"
            if fp16:      # both halves already fp16: pick them with one byte permute
                sel = "0x5410" if pa % 2 == 0 else "0x7632"
                lines.append(f"prmt.b32 {out}, v{pa // 2}, v{pb // 2}, {sel};")
            else:         # bf16 -> fp32 is a shift (low half) or a mask (high half), then one packed cvt
                for reg, p in (("fa", pa), ("fb", pb)):
                    if p % 2 == 0:
                        lines.append(f"shl.b32 {reg}, v{p // 2}, 16;")
                    else:
                        lines.append(f"and.b32 {reg}, v{p // 2}, 0xFFFF0000;")
                lines.append(f"cvt.rn.f16x2.f32 {out}, fb, fa;")
    return "{\n" + "\n".join(lines) + "\n}"


def _dot_ptx(bits: int) -> str:
    """PTX: sum over a unit's U words (codes of one row) of (q - z) * x' as fp32: $1..$U the words, then
    1024 + z (and 64 + z at 4 bits) as half2, then the unit's x pairs from _xprep_ptx."""
    cpw = 32 // bits
    half = cpw // 2
    za = f"${U + 1}"
    zb = f"${U + 2}" if bits == 4 else za
    x0 = U + 3 if bits == 4 else U + 2
    lines = [".reg .b32 t0, t1, t2, t3, u, acc;", ".reg .b16 lo, hi;", ".reg .f32 fl, fh;"]
    first = True
    for j in range(U):
        w = f"${1 + j}"
        if bits == 4:     # t0 = codes (0, 4), t1 = (1, 5), t2 = (2, 6), t3 = (3, 7)
            lines += [f"lop3.b32 t0, {w}, 0x000F000F, 0x64006400, 0xEA;",
                      f"lop3.b32 t1, {w}, 0x00F000F0, 0x54005400, 0xEA;", f"shr.u32 u, {w}, 8;",
                      "lop3.b32 t2, u, 0x000F000F, 0x64006400, 0xEA;",
                      "lop3.b32 t3, u, 0x00F000F0, 0x54005400, 0xEA;",
                      f"sub.f16x2 t0, t0, {za};", f"sub.f16x2 t1, t1, {zb};", f"sub.f16x2 t2, t2, {za};",
                      f"sub.f16x2 t3, t3, {zb};"]
        else:             # t0 = codes (0, 2), t1 = (1, 3)
            lines += [f"lop3.b32 t0, {w}, 0x00FF00FF, 0x64006400, 0xEA;", f"shr.u32 u, {w}, 8;",
                      "lop3.b32 t1, u, 0x00FF00FF, 0x64006400, 0xEA;",
                      f"sub.f16x2 t0, t0, {za};", f"sub.f16x2 t1, t1, {za};"]
        for i in range(half):
            xp = f"${x0 + j * half + i}"
            if first:
                lines.append(f"mul.rn.f16x2 acc, t{i}, {xp};")
                first = False
            else:
                lines.append(f"fma.rn.f16x2 acc, t{i}, {xp}, acc;")
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 fl, lo;", "cvt.f32.f16 fh, hi;", "add.f32 $0, fl, fh;"]
    return "{\n" + "\n".join(lines) + "\n}"


_XP4B = tl.constexpr(_xprep_ptx(4, False))
_XP4H = tl.constexpr(_xprep_ptx(4, True))
_XP8B = tl.constexpr(_xprep_ptx(8, False))
_XP8H = tl.constexpr(_xprep_ptx(8, True))
_DOT4 = tl.constexpr(_dot_ptx(4))
_DOT8 = tl.constexpr(_dot_ptx(8))
_C_XP4 = tl.constexpr("=r," * 17 + ",".join(["r"] * 16))      # inline-asm constraints: outputs, inputs
_C_XP8 = tl.constexpr("=r," * 9 + ",".join(["r"] * 8))
_C_DOT4 = tl.constexpr("=r," + ",".join(["r"] * 22))
_C_DOT8 = tl.constexpr("=r," + ",".join(["r"] * 13))
# L2 prefetch of one contiguous byte range per element (Hopper's bulk prefetch: 16-byte aligned, 16-byte
# multiple); the dummy output keeps the op in the graph
_L2PF = tl.constexpr("cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;")
_ZPK = tl.constexpr("{\n.reg .f32 t;\n.reg .b16 h;\nadd.f32 t, $1, $2;\ncvt.rn.f16.f32 h, t;\n"
                    "mov.b32 $0, {h, h};\n}")


@triton.jit
def _raw(b, r: tl.constexpr, umask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(b + r)
    else:
        return tl.load(b + r, mask=umask, other=0)


@triton.jit
def _xprep(b, umask, BITS: tl.constexpr, FP16: tl.constexpr, EVEN: tl.constexpr):
    """The unit's half2 x pairs (tuple, word-major) and 2^-e (last): see _xprep_ptx."""
    if BITS == 4:
        raw = (_raw(b, 0, umask, EVEN), _raw(b, 1, umask, EVEN), _raw(b, 2, umask, EVEN),
               _raw(b, 3, umask, EVEN), _raw(b, 4, umask, EVEN), _raw(b, 5, umask, EVEN),
               _raw(b, 6, umask, EVEN), _raw(b, 7, umask, EVEN), _raw(b, 8, umask, EVEN),
               _raw(b, 9, umask, EVEN), _raw(b, 10, umask, EVEN), _raw(b, 11, umask, EVEN),
               _raw(b, 12, umask, EVEN), _raw(b, 13, umask, EVEN), _raw(b, 14, umask, EVEN),
               _raw(b, 15, umask, EVEN))
        return tl.inline_asm_elementwise(_XP4H if FP16 else _XP4B, _C_XP4, raw,
                                         dtype=(tl.int32,) * 16 + (tl.float32,), is_pure=True, pack=1)
    else:
        raw = (_raw(b, 0, umask, EVEN), _raw(b, 1, umask, EVEN), _raw(b, 2, umask, EVEN),
               _raw(b, 3, umask, EVEN), _raw(b, 4, umask, EVEN), _raw(b, 5, umask, EVEN),
               _raw(b, 6, umask, EVEN), _raw(b, 7, umask, EVEN))
        return tl.inline_asm_elementwise(_XP8H if FP16 else _XP8B, _C_XP8, raw,
                                         dtype=(tl.int32,) * 8 + (tl.float32,), is_pure=True, pack=1)


@triton.jit
def _bx(v, like):
    """A unit's (NU,) x operand broadcast over the tile's rows."""
    return tl.broadcast_to(v[None, :], like.shape)


@triton.jit
def _zpk(z, off: tl.constexpr):
    """fp32 z -> int32 half2 (off + z, off + z) (exact for integer z < 1024)."""
    return tl.inline_asm_elementwise(_ZPK, "=r,r,r", [z, tl.full(z.shape, off, tl.float32)], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _pdl_start(QP, rn, N, wpr, t0, t1, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """Programmatic dependent launch (triton_wq.pdl_mode): start fetching this program's first PREFETCH K
    steps of words into L2 (the weights do not depend on the kernel before), then _pdl_begin: the wait for
    that kernel's writes (x)."""
    if PREFETCH > 0:
        a = QP + tl.minimum(rn, N - 1).to(tl.int64) * wpr + t0 * BLOCK_W
        nb = tl.full(rn.shape, 0, tl.int32) + tl.minimum(t1 - t0, PREFETCH) * (BLOCK_W * 4)
        tl.inline_asm_elementwise(_L2PF, "=r,l,r", [a, nb], dtype=tl.int32, is_pure=False, pack=1)
    _pdl_begin(PDL)


@triton.jit
def _wq_gemv1p_kernel(X, QW, S, Z, B, Y, WS, CNT, N, K, wpr, QP, BITS: tl.constexpr, GS: tl.constexpr,
                      HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr, FP16: tl.constexpr,
                      PIPE: tl.constexpr = 0, TMA: tl.constexpr = False, PDL: tl.constexpr = 0,
                      PREFETCH: tl.constexpr = 0):
    """Program (pid_n, pid_k) owns BLOCK_N rows and a contiguous run of K steps of BLOCK_W words, as
    triton_gemv1._wq_gemv1m_kernel (flat tile, next step's words in flight, split K reduced by the last program
    of a row block). Each step is BLOCK_W / U units of U words; per unit and row one fp16 partial sum.
    PIPE > 0: no register prefetch; Triton pipelines the step loads PIPE deep through shared memory.
    TMA (with PIPE > 0): QW is a tensor descriptor of (BLOCK_N, BLOCK_W) word tiles, fetched by the copy
    engine PIPE deep (no per-thread address work, edges zero-filled).
    PDL (1, 2; Hopper, launched with launch_pdl): _pdl_start, with PREFETCH steps of words sent to L2 ahead
    (TMA launches; the pointer launches load their first step into registers before the wait instead).
    QP: the words as a pointer (QW itself unless TMA)."""
    CPW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GS // CPW
    NU: tl.constexpr = BLOCK_W // 4
    if TMA:
        pid_n, pid_k, t0, t1, _, rn = _m1_run(wpr, BLOCK_N, BLOCK_W, SPLIT_K)
        nmask = rn < N
        w = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
        if PDL > 0:
            _pdl_start(QP, rn, N, wpr, t0, t1, BLOCK_W, PREFETCH, PDL)
    else:
        pid_n, pid_k, t0, t1, rn, rw, nmask, rows, w = _m1_start(QW, N, wpr, BLOCK_N, BLOCK_W, SPLIT_K, EVEN)
        if PDL > 0:
            _pdl_start(QP, rn, N, wpr, t0, t1, BLOCK_W, 0, PDL)
    ru = tl.arange(0, NU)
    xw = X.to(tl.pointer_type(tl.int32), bitcast=True)                      # x as pairs of 16-bit values
    acc = tl.zeros((BLOCK_N, NU), dtype=tl.float32)
    for t in tl.range(t0, t1, num_stages=PIPE if PIPE > 0 else None):
        if TMA:
            w = QW.load([pid_n * BLOCK_N, t * BLOCK_W])
            wn = w
        elif PIPE > 0:        # Triton's software pipeline (cp.async through shared memory) instead
            w = _m1_words(rows, t * BLOCK_W + rw, nmask, wpr, EVEN)
            wn = w
        else:
            wn = _m1_words(rows, tl.minimum(t + 1, t1 - 1) * BLOCK_W + rw, nmask, wpr, EVEN)   # next step
        uw = t * BLOCK_W + ru * 4                                             # first word of each unit
        umask = uw < wpr
        xp = _xprep(xw + uw * (CPW // 2), umask, BITS, FP16, EVEN)
        if BLOCK_W <= WPG:                                                   # the step lies in one group
            g = (t * BLOCK_W) // WPG
            s = tl.load(S + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
            if HAS_ZERO:
                z = tl.load(Z + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
            else:
                z = tl.full((BLOCK_N, 1), 1 << (BITS - 1), tl.float32)
        else:                                                                # one group per unit
            gu = uw // WPG
            gm = nmask[:, None] & umask[None, :]
            s = tl.load(S + gu[None, :] * N + rn[:, None], mask=gm, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(Z + gu[None, :] * N + rn[:, None], mask=gm, other=0.0).to(tl.float32)
            else:
                z = tl.full((BLOCK_N, NU), 1 << (BITS - 1), tl.float32)
        z = tl.broadcast_to(z, (BLOCK_N, NU))
        c0, c1 = tl.split(tl.reshape(w, (BLOCK_N, NU, 2, 2)))       # word 4u + 2a + b: split b, then a
        w0, w2 = tl.split(c0)
        w1, w3 = tl.split(c1)
        if BITS == 4:
            part = tl.inline_asm_elementwise(
                _DOT4, _C_DOT4,
                (w0, w1, w2, w3, _zpk(z, 1024.0), _zpk(z, 64.0), _bx(xp[0], w0), _bx(xp[1], w0),
                 _bx(xp[2], w0), _bx(xp[3], w0), _bx(xp[4], w0), _bx(xp[5], w0), _bx(xp[6], w0),
                 _bx(xp[7], w0), _bx(xp[8], w0), _bx(xp[9], w0), _bx(xp[10], w0), _bx(xp[11], w0),
                 _bx(xp[12], w0), _bx(xp[13], w0), _bx(xp[14], w0), _bx(xp[15], w0)), dtype=tl.float32,
                is_pure=True, pack=1)
            finv = xp[16]
        else:
            part = tl.inline_asm_elementwise(
                _DOT8, _C_DOT8,
                (w0, w1, w2, w3, _zpk(z, 1024.0), _bx(xp[0], w0), _bx(xp[1], w0), _bx(xp[2], w0),
                 _bx(xp[3], w0), _bx(xp[4], w0), _bx(xp[5], w0), _bx(xp[6], w0), _bx(xp[7], w0)),
                dtype=tl.float32, is_pure=True, pack=1)
            finv = xp[8]
        acc += part * (s * finv[None, :])
        w = wn
    _pdl_end(PDL)
    y = tl.sum(acc, axis=1)                                                   # (BN,)
    _store_rows(y, rn, nmask, B, Y, WS, CNT, N, pid_n, pid_k, HAS_BIAS, SPLIT_K)


def unsupported(p: WQPack) -> str | None:
    """Why gemv1p cannot run this pack (None when it can)."""
    return gemv1p_reason(p.k, p.bits, p.group, p.int_zero)


def gemv1p(x2: torch.Tensor, p: WQPack, bias: torch.Tensor | None = None, *, block_n: int = 64,
           block_w: int | None = None, split_k: int = 1, num_warps: int = 1, pipe: int = 0,
           tma: bool = False, pdl: bool = False, prefetch: int = 0, pdl_trigger: str = "late") -> torch.Tensor:
    """M = 1 only; x in stored column order (permuted only under act-order). block_w: words per K step, a
    multiple of 4 (default: one g128 group, 16 words at 4 bits, 32 at 8). pipe: 0 = the next step's words
    loaded into registers ahead (255 registers at 64 x 32); n > 0 = Triton's n-stage cp.async pipeline
    through shared memory (123 registers at 64 x 32, 3 stages: twice the warps per SM). tma: the word tiles
    through the copy engine instead, pipe (at least 2) stages deep (the 4-bit dispatch launch: 64 x 16, 3
    stages, 128 registers). pdl: launched as a programmatic dependent launch (Hopper; triton_wq.pdl_reason):
    the next kernel may start while this one runs, and this one's programs start while the kernel before
    finishes, each waiting for it before reading x; prefetch: with tma, K steps of words each program
    sends to L2 before that wait; pdl_trigger: when the next kernel may be scheduled, "start" or "late"
    (after each program's K loop)."""
    mode = pdl_mode(pdl, pdl_trigger)                                  # the kernel's PDL constexpr
    why = pdl_reason(x2.device) if pdl else None
    if why is not None:
        raise ValueError(f"gemv1p: pdl=True: {why}; launch without it")
    why = unsupported(p)
    if why is not None:
        raise ValueError(f"gemv1p: {why}")
    L = m1_launch(x2, p, bias, "p", block_n, block_w, split_k, min_block_w=U)
    qa = p.qw
    if tma:
        qa, pipe = words_descriptor(p, block_n, L.block_w), max(pipe, 2)
    _wq_gemv1p_kernel[(L.n_blocks, L.split_k)](L.x, qa, p.scale, L.zero, L.b, L.y, L.ws, L.cnt, p.n, p.k, L.wpr,
                                               p.qw, BITS=p.bits, GS=p.group, HAS_ZERO=p.zero is not None,
                                               HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_W=L.block_w,
                                               SPLIT_K=L.split_k, EVEN=L.even, FP16=x2.dtype == torch.float16,
                                               PIPE=pipe, TMA=tma, PDL=mode, PREFETCH=prefetch if tma and pdl else 0,
                                               num_warps=num_warps, launch_pdl=pdl)
    return L.y
