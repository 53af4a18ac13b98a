"""GGML block formats in pure torch: float -> blocks (ggml's own quantizers, bit-exact), QWeight <-> blocks
(lossless repacking of codes and scales), and blocks -> QWeight (import without a float round trip).

Each GGUF row of K values is a run of blocks; a block holds `block_size` codes plus its scales:
  Q4_0/Q5_0  d (f16), codes q: w = d (q - 8 | 16)            = bitsmith's symmetric grid, g = 32
  Q8_0       d (f16), int8 q:  w = d q                        = bitsmith's symmetric 8-bit grid (code q + 128)
  Q4_1/Q5_1  d, m (f16), q:    w = d q + m                    = asymmetric, zero = -m / d
  Q4_K/Q5_K  256 values, f16 d and dmin, 8 sub-blocks of 32 with 6-bit scale sc and min mn:
             w = d sc q - dmin mn                             = asymmetric g = 32, float32 scales
  Q6_K       256 values, f16 d, 16 sub-blocks of 16 with int8 scales: w = d sc (q - 32)   = symmetric 6-bit g16
The float encoders follow the reference quantizers of the `gguf` package (ggml-quants.c) operation by
operation in float32, so they produce the same bytes (tests check it). The K-quant encoders search each sub-block's
range as ggml's make_qkx2_quants / make_qx_quants do (vectorised: candidate ranges refitted by weighted
least squares), then quantize the sub-block scales to 6/8 bits and re-choose the codes for them; their
SQNR is within ~0.1 dB (Q4_K, Q5_K) and ~0.3-0.5 dB (Q6_K) of llama-quantize's on the same weights, not
bit-exact (the gguf package has no K-quant quantizer to compare bytes with).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import BitsmithError
from ..primitives import QWeight, dequantize_weight
from ..recipe import Scheme

log = logging.getLogger(__name__)
QK_K = 256


@dataclass(frozen=True)
class BlockType:
    name: str
    block_size: int          # values per block
    type_size: int           # bytes per block
    bits: int
    group_size: int          # values per scale (the QWeight group)
    symmetric: bool
    scale_dtype: str         # the QWeight scale dtype that holds this type's scales exactly


BLOCK_TYPES = {t.name: t for t in (
    BlockType("Q4_0", 32, 18, 4, 32, True, "float16"),
    BlockType("Q4_1", 32, 20, 4, 32, False, "float16"),
    BlockType("Q5_0", 32, 22, 5, 32, True, "float16"),
    BlockType("Q5_1", 32, 24, 5, 32, False, "float16"),
    BlockType("Q8_0", 32, 34, 8, 32, True, "float16"),
    BlockType("Q4_K", QK_K, 144, 4, 32, False, "float32"),
    BlockType("Q5_K", QK_K, 176, 5, 32, False, "float32"),
    BlockType("Q6_K", QK_K, 210, 6, 16, True, "float32"),
)}
# Types whose grid a method can quantize on directly (`--gguf-compatible`): one f16 scale per 32 values.
COMPATIBLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def block_type(name: str) -> BlockType:
    if name not in BLOCK_TYPES:
        raise BitsmithError(f"unknown GGML block type {name!r}; supported: {', '.join(BLOCK_TYPES)}")
    return BLOCK_TYPES[name]


def gguf_scheme(name: str) -> Scheme:
    """The bitsmith Scheme whose QWeights export to GGUF type `name` losslessly (codes and scales as they are)."""
    if name not in COMPATIBLE:
        raise BitsmithError(f"--gguf-compatible takes one of {', '.join(COMPATIBLE)}, got {name!r} (K-quants' "
                            "6-bit sub-block scales are not a grid methods quantize on)")
    t = BLOCK_TYPES[name]
    return Scheme(bits=t.bits, group_size=32, symmetric=t.symmetric, scale_dtype="float16")


def _blocks(w: torch.Tensor, t: BlockType, name: str) -> torch.Tensor:
    """(N, K) float -> (N * K / block_size, block_size) float32; K must be a whole number of blocks."""
    n, k = w.shape
    if k % t.block_size:
        raise BitsmithError(f"{name}: {k} input features are not a multiple of {t.name}'s block of {t.block_size}")
    return w.detach().float().reshape(-1, t.block_size).contiguous()


def _f16(x: torch.Tensor) -> torch.Tensor:
    """(B, 1) float -> (B, 2) uint8: the little-endian f16 bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(B, 32) codes -> (B, 16) bytes: value i in the low nibble of byte i, value 16 + i in the high one."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(B, 32) 5-bit codes -> (B, 4) bytes: bit 4 of value i at bit i of a little-endian uint32."""
    bits = ((q >> 4) & 1).to(torch.int64).view(-1, 4, 8)                          # (B, 4, 8)
    return (bits << torch.arange(8)).sum(-1).to(torch.uint8)


def _recip(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero exactly as ggml's roundf (floor(a) + floor(2 (a - floor(a))), no a + 0.5)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


# ---- float -> blocks (ggml's reference quantizers) ---------------------------------------------------
def _encode_sym(b: torch.Tensor, t: BlockType) -> torch.Tensor:
    half = 1 << (t.bits - 1)                                                       # 8 or 16
    imax = b.abs().argmax(-1, keepdim=True)                                        # first of equal maxima
    d = torch.gather(b, -1, imax) / -half                                          # (B, 1)
    q = torch.trunc(b * _recip(d) + (half + 0.5)).clamp(0, 2 * half - 1).to(torch.uint8)
    return _pack_sym(d, q, t)


def _encode_asym(b: torch.Tensor, t: BlockType) -> torch.Tensor:
    qmax = (1 << t.bits) - 1
    mx, mn = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = (mx - mn) / qmax
    q = torch.trunc((b - mn) * _recip(d) + 0.5).clamp(0, qmax).to(torch.uint8)
    return _pack_asym(d, mn, q, t)


def _encode_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = b.abs().amax(-1, keepdim=True) / 127
    q = _roundf(b * _recip(d)).to(torch.int8)
    return torch.cat([_f16(d), q.view(torch.uint8)], -1)


def _pack_sym(d: torch.Tensor, q: torch.Tensor, t: BlockType) -> torch.Tensor:
    """d (B, 1), unsigned codes q (B, 32) -> Q4_0 / Q5_0 / Q8_0 blocks."""
    if t.name == "Q8_0":
        return torch.cat([_f16(d), (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)], -1)
    parts = [_f16(d)] + ([_high_bits(q)] if t.bits == 5 else []) + [_nibbles(q)]
    return torch.cat(parts, -1)


def _pack_asym(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, t: BlockType) -> torch.Tensor:
    parts = [_f16(d), _f16(m)] + ([_high_bits(q)] if t.bits == 5 else []) + [_nibbles(q)]
    return torch.cat(parts, -1)


# ---- K-quants ------------------------------------------------------------------------------------------
def _pack_scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """(B, 8) 6-bit scales and mins -> (B, 12) bytes, the layout of ggml's get_scale_min_k4."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], -1)


def _unpack_scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], -1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], -1)
    return sc, mn


def _k_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(B, 256) codes -> (B, 128): chunk c of 64 values, byte i = value 64c + i | value 64c + 32 + i << 4."""
    q = q.view(-1, 4, 2, 32)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)


def _k_high(q: torch.Tensor) -> torch.Tensor:
    """(B, 256) 5-bit codes -> (B, 32): bit j of byte i = bit 4 of value 32 j + i."""
    bits = ((q >> 4) & 1).to(torch.int64).view(-1, 8, 32)
    return (bits << torch.arange(8).view(1, 8, 1)).sum(1).to(torch.uint8)


def _pack_k(t: BlockType, d, dmin, sc, mn, q) -> torch.Tensor:
    parts = [_f16(d), _f16(dmin), _pack_scales_k4(sc, mn)]
    if t.bits == 5:
        parts.append(_k_high(q))
    return torch.cat(parts + [_k_nibbles(q)], -1)


SEARCH_CHUNK = 8192       # sub-blocks per step of the range search (bounds its (S, 21, 32) temporaries)


def _search_asym(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (S, n) scale and min (<= 0, returned negated) minimising the |x|-weighted squared error
    over 21 candidate ranges, each refitted by weighted least squares (ggml's make_qkx2_quants)."""
    w = (x.pow(2).mean(-1, keepdim=True)).sqrt() + x.abs()                         # (S, n) ggml's weights
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True)
    width = (hi - lo).unsqueeze(1)                                                 # (S, 1, 1)
    steps = (-1.0 + 0.1 * torch.arange(21, dtype=x.dtype)).view(1, -1, 1) + qmax  # candidate code spans
    inv = torch.where(width > 0, steps / width.clamp(min=1e-30), torch.zeros_like(width))     # (S, 21, 1)
    xs, ws = x.unsqueeze(1), w.unsqueeze(1)
    lv = torch.round(inv * (xs - lo.unsqueeze(1))).clamp(0, qmax)                  # (S, 21, n)
    sw, sx = ws.sum(-1), (ws * xs).sum(-1)
    sl, sl2, sxl = (ws * lv).sum(-1), (ws * lv * lv).sum(-1), (ws * lv * xs).sum(-1)
    det = sw * sl2 - sl * sl
    ok = det > 0
    scale = torch.where(ok, (sw * sxl - sx * sl) / torch.where(ok, det, 1.0), 0.0)
    mn = torch.where(ok, (sl2 * sx - sl * sxl) / torch.where(ok, det, 1.0), 0.0)
    pos = mn > 0                                                                   # a min above 0: refit scale alone
    scale = torch.where(pos, sxl / sl2.clamp(min=1e-30), scale)
    mn = torch.where(pos, torch.zeros_like(mn), mn)
    err = (ws * (scale.unsqueeze(-1) * lv + mn.unsqueeze(-1) - xs) ** 2).sum(-1)  # (S, 21)
    # candidate 0 of the search is plain min-max; keep it where no refit beats it
    base_scale, base_min = (width.squeeze(1) / qmax).squeeze(-1), lo.squeeze(-1)
    base_l = torch.round((x - lo) / torch.where(width.squeeze(1) > 0, base_scale.unsqueeze(-1), 1.0)).clamp(0, qmax)
    base_err = (w * (base_scale.unsqueeze(-1) * base_l + base_min.unsqueeze(-1) - x) ** 2).sum(-1)
    best = err.argmin(-1, keepdim=True)
    better = (err.gather(-1, best).squeeze(-1) < base_err) & ok.gather(-1, best).squeeze(-1)
    scale = torch.where(better, scale.gather(-1, best).squeeze(-1), base_scale)
    mn = torch.where(better, mn.gather(-1, best).squeeze(-1), base_min)
    return scale.clamp(min=0), (-mn).clamp(min=0)


def _encode_k_asym(b: torch.Tensor, t: BlockType) -> torch.Tensor:
    """Q4_K / Q5_K: each sub-block's range searched as ggml does, then 6-bit scales and mins under f16 d, dmin."""
    qmax = (1 << t.bits) - 1
    sub = b.view(-1, 8, 32)
    flat = sub.reshape(-1, 32)
    parts = [_search_asym(flat[i:i + SEARCH_CHUNK], qmax) for i in range(0, flat.shape[0], SEARCH_CHUNK)]
    scale = torch.cat([p[0] for p in parts]).view(-1, 8)
    mn = torch.cat([p[1] for p in parts]).view(-1, 8)                              # (B, 8) >= 0
    d = (scale.amax(-1, keepdim=True) / 63).to(torch.float16).float()             # (B, 1)
    dmin = (mn.amax(-1, keepdim=True) / 63).to(torch.float16).float()
    sc = torch.round(scale * _recip(d)).clamp(0, 63)
    m6 = torch.round(mn * _recip(dmin)).clamp(0, 63)
    step, off = (d * sc).unsqueeze(-1), (dmin * m6).unsqueeze(-1)                 # (B, 8, 1)
    q = torch.round((sub + off) * _recip(step)).clamp(0, qmax).to(torch.uint8).view(-1, QK_K)
    return _pack_k(t, d, dmin, sc, m6, q)


def _pack_q6_k(d, sc, q) -> torch.Tensor:
    """d (B, 1), int8 scales (B, 16), unsigned 6-bit codes (B, 256) -> (B, 210)."""
    q = q.view(-1, 2, 4, 32)                                                       # half, quarter, i
    ql = ((q[:, :, 0:2] & 0x0F) | ((q[:, :, 2:4] & 0x0F) << 4)).reshape(-1, 128)  # byte h*64 + i
    hi = ((q >> 4) & 3).to(torch.int64)                                            # (B, 2, 4, 32)
    qh = (hi << (2 * torch.arange(4)).view(1, 1, 4, 1)).sum(2).to(torch.uint8).reshape(-1, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16(d)], -1)


def _search_sym(x: torch.Tensor, nmax: int = 32) -> torch.Tensor:
    """Per sub-block (S, n) signed scale of codes in [-nmax, nmax): 19 candidate scales around max / -nmax,
    each refitted by x^2-weighted least squares; the one with the largest fitted energy wins (ggml's
    make_qx_quants, rmse_type 1)."""
    imax = x.abs().argmax(-1, keepdim=True)
    top = torch.gather(x, -1, imax)                                                # (S, 1) signed
    steps = (nmax + 0.1 * torch.arange(-9, 10, dtype=x.dtype)).view(1, -1, 1)      # (1, 19, 1)
    inv = torch.where(top.unsqueeze(1) != 0, -steps / torch.where(top == 0, 1.0, top).unsqueeze(1), 0.0)
    xs = x.unsqueeze(1)
    lv = torch.round(inv * xs).clamp(-nmax, nmax - 1)                              # (S, 19, n)
    w = xs * xs
    slx, sl2 = (w * xs * lv).sum(-1), (w * lv * lv).sum(-1)                        # (S, 19)
    gain = torch.where(sl2 > 0, slx * slx / sl2.clamp(min=1e-30), torch.full_like(sl2, -1.0))
    best = gain.argmax(-1, keepdim=True)
    scale = slx.gather(-1, best) / sl2.gather(-1, best).clamp(min=1e-30)
    return torch.where(sl2.gather(-1, best) > 0, scale, 0.0).squeeze(-1)


def _encode_q6_k(b: torch.Tensor) -> torch.Tensor:
    """Q6_K: per 16 values a signed scale searched as ggml does, int8-quantized under one f16 d."""
    sub = b.view(-1, 16, 16)
    flat = sub.reshape(-1, 16)
    scale = torch.cat([_search_sym(flat[i:i + SEARCH_CHUNK]) for i in range(0, flat.shape[0], SEARCH_CHUNK)])
    scale = scale.view(-1, 16)                                                     # (B, 16) signed
    amax = torch.gather(scale, -1, scale.abs().argmax(-1, keepdim=True))          # (B, 1)
    d = (amax / -128).to(torch.float16).float()
    sc = torch.round(scale * _recip(d)).clamp(-128, 127)
    step = (d * sc).unsqueeze(-1)                                                  # (B, 16, 1)
    q = (torch.round(sub * _recip(step)) + 32).clamp(0, 63).to(torch.uint8).view(-1, QK_K)
    return _pack_q6_k(d, sc, q)


def encode(w: torch.Tensor, type_name: str, name: str = "weight") -> torch.Tensor:
    """(N, K) float -> (N, K / block_size * type_size) uint8 GGML blocks of `type_name`, ggml's way."""
    t = block_type(type_name)
    b = _blocks(w, t, name)
    if t.name == "Q8_0":
        out = _encode_q8_0(b)
    elif t.name in ("Q4_0", "Q5_0"):
        out = _encode_sym(b, t)
    elif t.name in ("Q4_1", "Q5_1"):
        out = _encode_asym(b, t)
    elif t.name == "Q6_K":
        out = _encode_q6_k(b)
    else:
        out = _encode_k_asym(b, t)
    return out.reshape(w.shape[0], -1)


# ---- QWeight -> blocks (lossless) ----------------------------------------------------------------------
def lossless_reason(qw: QWeight, type_name: str) -> str | None:
    """Why `qw`'s codes and scales cannot be carried into `type_name` blocks as they are (None: they can)."""
    t = block_type(type_name)
    s = qw.scheme
    if s.grid != "int" or s.bits != t.bits or s.symmetric != t.symmetric:
        return f"its grid {s.label()} is not {t.name}'s {t.bits}-bit {'sym' if t.symmetric else 'asym'} grid"
    if qw.group_size != t.group_size:
        return f"group size {qw.group_size} is not {t.name}'s {t.group_size}"
    if qw.perm is not None or qw.transform:
        return "it carries an act-order permutation or a transform"
    if qw.shape[1] % t.block_size:
        return f"{qw.shape[1]} input features are not a multiple of {t.block_size}"
    if t.name in COMPATIBLE and not torch.equal(qw.scale.float(), qw.scale.to(torch.float16).float()):
        return "its scales are not float16 values"
    if t.name not in COMPATIBLE and _k_factors(qw, t) is None:
        return f"its scales do not factor into {t.name}'s f16 super-scales times 6/8-bit sub-scales"
    return None


def from_qweight(qw: QWeight, type_name: str) -> torch.Tensor:
    """Repack a QWeight on `type_name`'s grid into its blocks: codes and scales exactly as they are; for
    Q4_1/Q5_1 the min -zero*scale is rounded to f16 (exact for imported GGUF mins)."""
    t = block_type(type_name)
    why = lossless_reason(qw, t.name)
    if why:
        raise BitsmithError(f"cannot repack as {t.name}: {why}")
    n, k = qw.shape
    q = qw.codes.to(torch.uint8).reshape(-1, t.block_size)
    if t.name in ("Q4_K", "Q5_K", "Q6_K"):
        out = _k_from_qweight(qw, t, q)
    else:
        d = qw.scale.float().reshape(-1, 1)
        if t.symmetric:
            out = _pack_sym(d, q, t)
        else:
            out = _pack_asym(d, -(qw.zero.float().reshape(-1, 1) * d), q, t)
    return out.reshape(n, -1)


def _k_factors(qw: QWeight, t: BlockType):
    """(d, sc, dmin, mn) with scale = d sc and zero scale = dmin mn per super-block, or None."""
    per = QK_K // t.group_size
    scale = qw.scale.float().reshape(-1, per)                                      # (B, 8 | 16)
    if t.symmetric:
        amax = torch.gather(scale, -1, scale.abs().argmax(-1, keepdim=True))
        d = (amax / -128).to(torch.float16).float()
        sc = torch.round(scale * _recip(d))
        if not (torch.equal(d * sc, scale) and float(sc.abs().max()) <= 128 and float(sc.max()) <= 127):
            return None
        return d, sc, None, None
    d = (scale.amax(-1, keepdim=True) / 63).to(torch.float16).float()
    sc = torch.round(scale * _recip(d))
    if not (torch.equal(d * sc, scale) and float(sc.min()) >= 0 and float(sc.max()) <= 63):
        return None
    off = (qw.zero.float().reshape(-1, per) * scale)                               # dmin * mn, approximately
    dmin = (off.amax(-1, keepdim=True) / 63).to(torch.float16).float()
    mn = torch.round(off * _recip(dmin))
    if float(mn.min()) < 0 or float(mn.max()) > 63:
        return None
    # the f32 zero of an imported K-quant reproduces dmin * mn to float32 rounding
    if not torch.allclose(dmin * mn, off, rtol=1e-5, atol=float(dmin.abs().max()) * 1e-4):
        return None
    return d, sc, dmin, mn


def _k_from_qweight(qw: QWeight, t: BlockType, q: torch.Tensor) -> torch.Tensor:
    d, sc, dmin, mn = _k_factors(qw, t)
    if t.symmetric:
        return _pack_q6_k(d, sc, q)
    return _pack_k(t, d, dmin, sc, mn, q)


# ---- blocks -> QWeight (import) ------------------------------------------------------------------------
def to_qweight(data: torch.Tensor, type_name: str, shape: tuple[int, int]) -> QWeight:
    """(N, K / block_size * type_size) uint8 blocks -> QWeight with the blocks' codes and scales as they are.
    Q4_1/Q5_1/K-quant zeros are float32 zero = min / scale, so from_qweight gives the same bytes back."""
    t = block_type(type_name)
    n, k = shape
    if k % t.block_size or data.numel() != n * (k // t.block_size) * t.type_size:
        raise BitsmithError(f"{type_name} tensor of shape {shape} needs {n * k // t.block_size * t.type_size} bytes "
                            f"of whole blocks, got {data.numel()}")
    b = data.reshape(-1, t.type_size).contiguous()
    scheme = Scheme(bits=t.bits, group_size=t.group_size, symmetric=t.symmetric, scale_dtype=t.scale_dtype)
    if t.name == "Q8_0":
        scale = b[:, :2].contiguous().view(torch.float16)
        q = (b[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return _qweight(q, scale, None, scheme, n, k)
    if t.name in ("Q4_0", "Q5_0", "Q4_1", "Q5_1"):
        off = 2 if t.symmetric else 4
        q = _unpack_small(b[:, off:], t)
        scale = b[:, :2].contiguous().view(torch.float16)
        zero = None
        if not t.symmetric:
            m = b[:, 2:4].contiguous().view(torch.float16).float()
            # -(m * 0) keeps the sign of a zero min through -(zero * d) on export (byte-exact -0.0 / +0.0)
            zero = torch.where(scale.float() == 0, -(m * 0), -m / scale.float())
            _warn_constant_blocks(scale.float(), m, type_name)
        return _qweight(q, scale, zero, scheme, n, k)
    if t.name == "Q6_K":
        ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208].contiguous().view(torch.int8).float()
        d = b[:, 208:210].contiguous().view(torch.float16).float()
        lo = torch.stack([ql.view(-1, 2, 64) & 0x0F, ql.view(-1, 2, 64) >> 4], 2).view(-1, 2, 4, 32)
        hi = (qh.view(-1, 2, 1, 32) >> (2 * torch.arange(4, dtype=torch.uint8)).view(1, 1, 4, 1)) & 3
        q = (lo | (hi << 4)).reshape(-1, QK_K)
        return _qweight(q, d * sc, None, scheme, n, k)
    d = b[:, 0:2].contiguous().view(torch.float16).float()
    dmin = b[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    ql = b[:, -128:].reshape(-1, 4, 1, 32)
    q = ((ql >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)) & 0x0F).reshape(-1, QK_K)
    if t.bits == 5:
        qh = b[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        q = q | ((qh & 1).reshape(-1, QK_K) << 4)
    scale = d * sc.float()                                                         # exact in float32
    zero = (dmin * mn.float()) / scale
    _warn_constant_blocks(scale, dmin * mn.float(), type_name)
    return _qweight(q, scale, zero, scheme, n, k)


def _warn_constant_blocks(scale: torch.Tensor, offset: torch.Tensor, type_name: str) -> None:
    """A block with scale 0 but a non-zero min is a constant (q - zero) * scale cannot hold: it imports as 0."""
    lost = int(((scale == 0) & (offset != 0)).sum())
    if lost:
        log.warning("%d %s block(s) hold a constant non-zero value (scale 0, min != 0); imported as 0", lost,
                    type_name)


def _unpack_small(qs: torch.Tensor, t: BlockType) -> torch.Tensor:
    """Q4_0/Q4_1/Q5_0/Q5_1 code bytes (after the scales) -> (B, 32) uint8 codes."""
    nib = qs[:, -16:]
    q = torch.cat([nib & 0x0F, nib >> 4], -1)
    if t.bits == 5:
        qh = qs[:, :4].to(torch.int64)
        bits = (qh.unsqueeze(-1) >> torch.arange(8)).reshape(-1, 32) & 1
        q = q | (bits.to(torch.uint8) << 4)
    return q


def _qweight(q, scale, zero, scheme, n, k) -> QWeight:
    g = scheme.group_size
    scale = scale.reshape(n, k // g)
    if zero is not None:
        # A block whose scale is 0 holds one constant value, its min, which (q - zero) * 0 cannot express:
        # it becomes 0 (exact for all-zero blocks; a constant non-zero block is vanishingly rare in weights).
        zero = torch.nan_to_num(zero.reshape(n, k // g), nan=0.0, posinf=0.0, neginf=0.0)
    return QWeight(q.reshape(n, k).contiguous(), scale.contiguous(), zero, scheme)


def dequantize_blocks(data: torch.Tensor, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """GGML blocks -> (N, K) float32 (through the QWeight: the value bitsmith computes with)."""
    return dequantize_weight(to_qweight(data, type_name, shape))
