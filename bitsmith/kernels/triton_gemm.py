"""Tensor-core GEMM and dense dequantization for weight-only integer quantization (W4A16, W8A16).

  gemm     M >= 2: tensor cores, operands swapped (weights on the MMA's wide side, x on its narrow side),
           split K. Each K step dequantizes a (BLOCK_N, BLOCK_W) tile of words (4-bit: packed half-float
           instructions, _dq4_asm), interleaves the code positions in registers into stored column order
           and issues one dot against a contiguous x tile. Word and x tiles can come through Hopper's copy
           engine (TMA descriptors, `tma=True`), which Triton pipelines num_stages deep; pointer loads that
           feed no dot are not pipelined.
  dequant  writes the dense (N, K) weight in stored column order (gemm's dequantization, one contiguous
           store per row), for large M where cuBLAS on the dense weight wins.
Shared pieces (split-K scratch, scales, x order, TMA descriptors) are in triton_wq.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import WQPack
from .triton_wq import (_code, _code_inv_scale, _operands, _scratch, _step_scales, steps_in_group, stored_x,
                        words_descriptor, x_descriptor)


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
def _kperm_w(c):
    """The 8 (BN, 16) code tiles of a 16-word step of 4-bit codes -> (BN, 128) in the MMA's K order (see
    _wq_gemm_kernel's KPERM): word 4c + w', code 4b + 2sp + h at dot position 32w' + 16sp + 8h + 2c + b."""
    bn: tl.constexpr = c[0].shape[0]
    t = tl.join(tl.join(tl.join(c[0], c[4]), tl.join(c[1], c[5])),      # (BN, 16, b, h, sp)
                tl.join(tl.join(c[2], c[6]), tl.join(c[3], c[7])))
    t = tl.permute(tl.reshape(t, (bn, 4, 4, 2, 2, 2)), (0, 2, 5, 4, 1, 3))
    return tl.reshape(t, (bn, 128))


@triton.jit
def _kperm_x(xt):
    """A (BM, 128) x tile in stored column order -> the MMA's K order of _kperm_w (stored column
    32c + 8w' + 4b + 2sp + h at dot position 32w' + 16sp + 8h + 2c + b)."""
    bm: tl.constexpr = xt.shape[0]
    t = tl.permute(tl.reshape(xt, (bm, 4, 4, 2, 2, 2)), (0, 2, 4, 5, 1, 3))
    return tl.reshape(t, (bm, 128))


@triton.jit
def _dq_tile(w, s, z, BITS: tl.constexpr, ASM: tl.constexpr, FP16: tl.constexpr, SCALED: tl.constexpr,
             dt: tl.constexpr, KPERM: tl.constexpr = 0):
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
    if KPERM:
        return _kperm_w(c)
    return tl.reshape(_interleave(c, CPW), (w.shape[0], w.shape[1] * CPW))


@triton.jit
def _wq_gemm_kernel(X, QW, S, Z, B, Y, WS, CNT, M, N, K, wpr, stride_xm, stride_ym,
                      BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
                      ASM: tl.constexpr, EVEN: tl.constexpr, FP16: tl.constexpr, TMA: tl.constexpr = False,
                      SCALE_AFTER: tl.constexpr = False, KPERM: tl.constexpr = 0):
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
    launches only, gemm_config).
    KPERM (4 bits, 16-word steps): a dot's K positions may come in any order shared by both operands, so each
    step takes the order in which the dequantization's outputs already are the MMA's A fragments. A thread
    of the fragment layout holds, per 16-deep slice, the K pairs (2c, 2c + 1) and (2c + 8, 2c + 9) of two
    rows (c = lane % 4); in stored order those pairs are spread over every word, so Triton moved the
    dequantized tile through shared memory (4 store / ldmatrix rounds and 8 barriers per step) and waited
    on each wgmma. In the KPERM order, stored column 32c + 8w' + 4b + 2sp + h of the step sits at dot
    position 32w' + 16sp + 8h + 2c + b: thread column c needs exactly the words 4c..4c+3 (one 16-byte
    load per row), and each packed pair (codes i, i + 4) of _dq4_asm is one fragment register. x is
    permuted the same way (_kperm_x per tile, or once per call on the host: KPERM = 2). SASS of the K loop
    (offline, M = 16): 3.8 instead of 5.6 instructions per code, the 8 wgmmas of a step issued back to back."""
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
        wt = _dq_tile(w, s, z, BITS, ASM, FP16, not SCALE_AFTER, Y.dtype.element_ty, KPERM)
        if TMA:
            xt = X.load([pid_m * BLOCK_M, t * (BLOCK_W * CPW)])
        else:
            xk = t * (BLOCK_W * CPW) + tl.arange(0, BLOCK_W * CPW)
            xt = tl.load(X + rm[:, None] * stride_xm + xk[None, :], mask=mmask[:, None] & (xk < K)[None, :],
                         other=0.0)
        if KPERM == 1:
            xt = _kperm_x(xt)
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
def gemm(x2: torch.Tensor, p: WQPack, bias: torch.Tensor | None = None, *, block_m: int | None = None,
         block_n: int = 128, block_w: int | None = None, split_k: int = 1, num_warps: int = 4,
         num_stages: int = 3, asm: bool = True, tma: bool = False, scale_after: bool = False,
         kperm: int = 0) -> torch.Tensor:
    """`asm`: 4-bit codes with integer zero points dequantized by packed half-float instructions
    (_dq4_asm); 8-bit codes, fractional zeros and asm=False take the fp32 path. x is read in the weights'
    stored column order (gathered only under act-order). `tma`: x and the words through the copy engine
    (tma_reason says where it cannot). `scale_after`: scales applied to each step's product instead of to
    every code (K steps must lie within one group, steps_in_group; gemm_config says where it is faster).
    `kperm` (4 bits, 16-word steps): the dot runs over each step's K positions in the order that puts every
    dequantized code pair straight into the MMA's register fragments (_wq_gemm_kernel); x follows that order,
    permuted per tile in the kernel (1) or once per call here (2, K a multiple of 128)."""
    m = x2.shape[0]
    if kperm and not kperm_ok(p, block_w or 16, 1, asm):
        raise ValueError("gemm: kperm needs the 4-bit packed dequantization (asm, integer zero points) and "
                         "16-word K steps")
    if kperm == 2 and not kperm_ok(p, block_w or 16, 2, asm):
        raise ValueError(f"gemm: kperm=2 permutes x per 128 columns, K={p.k} is not a multiple; use kperm=1")
    xp = kperm_x(x2, p) if kperm == 2 else stored_x(x2, p)
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
        FP16=x2.dtype == torch.float16, TMA=tma, SCALE_AFTER=scale_after, KPERM=kperm, num_warps=num_warps,
        num_stages=num_stages)
    return y


def kperm_ok(p: WQPack, block_w: int, kperm: int, asm: bool = True) -> bool:
    """Whether gemm can run `kperm` on this pack: the 4-bit packed dequantization (integer zero points) in
    16-word steps; kperm = 2 also needs K a multiple of 128 (x is permuted per 128 columns)."""
    return asm and p.bits == 4 and p.int_zero and block_w == 16 and (kperm != 2 or p.k % 128 == 0)


def kperm_x(x2: torch.Tensor, p: WQPack) -> torch.Tensor:
    """x in stored column order, each 128 columns permuted into the MMA's K order of _kperm_x (a contiguous
    copy; K a multiple of 128)."""
    x = stored_x(x2, p)
    m, k = x.shape
    return x.reshape(m, k // 128, 4, 4, 2, 2, 2).permute(0, 1, 3, 5, 6, 2, 4).reshape(m, k)


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
