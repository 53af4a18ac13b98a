"""Pure quantization math: choose scale and zero point, quantize, dequantize, fake-quantize; `QWeight`.

Affine quantization maps a real x to a code q = clamp(round(x / s) + z, qmin, qmax) and back to s (q - z).
The range always includes 0 so that z is an exact code (padding and ReLU zeros stay exact), and z is
computed for the grid actually used: z = qmin - round(xmin / s). The textbook z = round(-xmin / s) is the
formula of the *unsigned* grid; used with a signed int8 grid and clamped to 127 it wipes out every positive
value, which is the error in the seed lesson this module is tested against.

A weight (N, K) is quantized in groups of `group_size` consecutive input features per output row; the last
group may be ragged. Codes are stored unsigned (see numerics.py); `QWeight` carries them unpacked.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .errors import BitsmithError
from .numerics import DQ_BLOCK, FP8_DTYPES, FP8_MAX, IntGrid, codebook, float_dtype, hadamard_factors
from .packing import pack, unpack
from .recipe import Scheme


@dataclass(frozen=True, slots=True)
class QWeight:
    """What every method returns and every format reads: a method never knows how bits are packed; a
    format never knows which method chose the codes."""

    codes: torch.Tensor                 # (N, K) uint8 unsigned codes or codebook indices
    scale: torch.Tensor                 # (N, G) G = ceil(K / g), in scheme.scale_dtype
    zero: torch.Tensor | None           # (N, G) zero point in code units (integral for RTN/GPTQ) or None
    scheme: Scheme
    perm: torch.Tensor | None = None    # (K,) act-order: codes describe W[:, perm]
    transform: dict[str, torch.Tensor] | None = None   # method-specific extras (Hadamard signs, ...)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        return self.scheme.group_size or self.codes.shape[1]


# ---- groups ------------------------------------------------------------------------------------------
def group_size_for(k: int, group_size: int | None) -> int:
    return k if group_size is None else min(group_size, k)


def to_groups(w: torch.Tensor, g: int) -> torch.Tensor:
    """(N, K) -> (N, G, g), the ragged last group padded with zeros (harmless: 0 is always in range)."""
    n, k = w.shape
    return torch.nn.functional.pad(w, (0, (-k) % g)).view(n, -1, g)


def group_mask(k: int, g: int, device=None) -> torch.Tensor:
    """(G, g) bool: True where a padded group position holds a real column."""
    return (torch.arange(-(-k // g) * g, device=device) < k).view(-1, g)


# ---- affine integer math -----------------------------------------------------------------------------
def choose_qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, grid: IntGrid, *, symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (in `grid`'s own codes) covering [xmin, xmax] extended to include 0.
    Zero-width ranges (all-zero groups) get scale 1, so every scale is finite and non-zero."""
    xmin = torch.clamp(xmin.float(), max=0.0)
    xmax = torch.clamp(xmax.float(), min=0.0)
    if symmetric:
        # Restricted range +-(2^(b-1) - 1) around the middle code: -x quantizes to the mirror of x.
        scale = torch.maximum(-xmin, xmax) / ((1 << (grid.bits - 1)) - 1)
    else:
        scale = (xmax - xmin) / (grid.qmax - grid.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _round_scale(scale, scale_dtype)
    if symmetric:
        zero = torch.full_like(scale, 0.0 if grid.signed else float(1 << (grid.bits - 1)))
    else:
        zero = torch.clamp(grid.qmin - torch.round(xmin / scale), grid.qmin, grid.qmax)
    return scale, zero


def _round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round the scale to its storage dtype *before* the codes are chosen, so codes fit the stored scale."""
    if dtype == torch.float32:
        return scale
    info = torch.finfo(dtype)
    if float(scale.max()) > info.max:
        raise BitsmithError(f"a scale of {float(scale.max()):.3g} overflows {dtype}; use scale_dtype float32")
    return torch.clamp(scale, min=info.smallest_normal * info.eps).to(dtype).float()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Codes of `grid` (int32), broadcasting scale and zero."""
    return torch.clamp(torch.round(x.float() / scale) + zero, grid.qmin, grid.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Quantize-dequantize in the forward pass, identity gradient (straight-through estimator)."""
    xq = dequantize(quantize(x, scale, zero, grid), scale, zero).to(x.dtype)
    return x + (xq - x).detach()


def minmax(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (axis None) or per-channel along `axis` (any axis) minimum and maximum, kept
    broadcastable against x."""
    if axis is None:
        return x.amin().reshape([1] * x.dim()), x.amax().reshape([1] * x.dim())
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def quantize_affine(
    x: torch.Tensor, bits: int, *, symmetric: bool = False, signed: bool = False, axis: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor or per-channel quantization of any tensor: (codes, scale, zero), all broadcastable."""
    check_finite(x, "tensor")
    grid = IntGrid(bits, signed)
    scale, zero = choose_qparams(*minmax(x, axis), grid, symmetric=symmetric)
    return quantize(x, scale, zero, grid), scale, zero


def check_finite(w: torch.Tensor, name: str) -> None:
    if bool(torch.isfinite(w.sum())):    # fast path: a finite sum means no NaN/Inf (overflow only errs safe)
        return
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise BitsmithError(f"{name} has {bad} NaN/Inf value(s); fix or exclude it (--ignore) before quantizing")


# ---- weights -> QWeight ------------------------------------------------------------------------------
def weight_qparams(
    w: torch.Tensor, scheme: Scheme, shrink: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scale (and zero) of an int-grid weight (N, K); `shrink` (broadcastable to (N, G)) narrows
    the range for clipping search. The zero is in unsigned code units."""
    g = group_size_for(w.shape[1], scheme.group_size)
    wg = to_groups(w.float(), g)                                   # (N, G, g)
    grid = IntGrid(scheme.bits, signed=False)
    scale, zero = choose_qparams(wg.amin(-1) * shrink, wg.amax(-1) * shrink, grid,
                                 symmetric=scheme.symmetric, scale_dtype=float_dtype(scheme.scale_dtype))
    return scale, (None if scheme.symmetric else zero)


def quantize_weight(
    w: torch.Tensor, scheme: Scheme, *, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
    name: str = "weight",
) -> QWeight:
    """Round-to-nearest a 2-D weight on `scheme`'s grid; `scale`/`zero` (N, G) may be given (clipping
    search, GPTQ), else min-max per group."""
    if w.dim() != 2:
        raise BitsmithError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    check_finite(w, name)
    w = w.detach().float()
    n, k = w.shape
    g = group_size_for(k, scheme.group_size)
    if scheme.grid != "int":
        return _quantize_lookup(w, scheme, g)
    if scale is None:
        scale, zero = weight_qparams(w, scheme)
    grid = IntGrid(scheme.bits, signed=False)
    z = torch.full_like(scale, symmetric_zero(scheme)) if zero is None else zero
    codes = quantize(to_groups(w, g), scale.float().unsqueeze(-1), z.float().unsqueeze(-1), grid)  # (N, G, g)
    codes = codes.reshape(n, -1)[:, :k]
    sdt = float_dtype(scheme.scale_dtype)
    return QWeight(codes.to(torch.uint8), scale.to(sdt), None if scheme.symmetric else zero.float(), scheme)


def symmetric_zero(scheme: Scheme) -> float:
    """The implicit zero of a symmetric unsigned-stored grid: 2^(b-1) (as in GGUF Q4_0 and MatMulNBits)."""
    return float(1 << (scheme.bits - 1))


def _quantize_lookup(w: torch.Tensor, scheme: Scheme, g: int) -> QWeight:
    """Codebook (NF4/FP4), FP8, binary and ternary grids: absmax- or mean-scaled, no zero point."""
    n, k = w.shape
    wg = to_groups(w, g)                                           # (N, G, g)
    valid = group_mask(k, g, w.device)                             # (G, g)
    count = valid.sum(-1).clamp(min=1)                             # (G,)
    absw = wg.abs()
    sdt = float_dtype(scheme.scale_dtype)
    if scheme.grid in ("nf4", "fp4"):
        scale = _round_scale(torch.where(absw.amax(-1) > 0, absw.amax(-1), 1.0), sdt)
        book = codebook(scheme.grid)
        mids = (book[1:] + book[:-1]) / 2                          # nearest level by midpoints
        codes = torch.bucketize(wg / scale.unsqueeze(-1), mids.to(w.device))
    elif scheme.grid in FP8_DTYPES:
        amax = absw.amax(-1)
        scale = _round_scale(torch.where(amax > 0, amax / FP8_MAX[scheme.grid], 1.0), sdt)
        fp8 = (wg / scale.unsqueeze(-1)).to(FP8_DTYPES[scheme.grid])
        codes = fp8.view(torch.uint8).to(torch.int64)
    elif scheme.grid == "binary":
        # XNOR-Net: sign(w) * mean|w| minimises ||w - a sign(w)||^2 over a.
        scale = _round_scale(torch.where(absw.sum(-1) > 0, absw.sum(-1) / count, 1.0), sdt)
        codes = (wg >= 0).to(torch.int64)
    elif scheme.grid == "ternary":
        # TWN (Li et al. 2016): threshold 0.7 mean|w|, scale = mean |w| above the threshold.
        delta = 0.7 * absw.sum(-1, keepdim=True) / count.unsqueeze(-1)
        keep = (absw > delta) & valid
        kept = keep.sum(-1)
        scale = torch.where(kept > 0, (absw * keep).sum(-1) / kept.clamp(min=1), 1.0)
        scale = _round_scale(scale, sdt)
        codes = 1 + torch.sign(wg).to(torch.int64) * keep
    else:  # pragma: no cover - Scheme validates grids
        raise BitsmithError(f"unknown grid {scheme.grid!r}")
    codes = codes.reshape(n, -1)[:, :k].to(torch.uint8)
    return QWeight(codes, scale.to(sdt), None, scheme)


def dequantize_weight(qw: QWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QWeight -> (N, K) float, in the original column order. The reference every kernel is tested against."""
    n, k = qw.codes.shape
    g = group_size_for(k, qw.scheme.group_size)
    scale = qw.scale.float().unsqueeze(-1)                            # (N, G, 1)
    grid = qw.scheme.grid
    if grid == "int":
        codes = to_groups(qw.codes, g).float()                        # (N, G, g)
        zero = symmetric_zero(qw.scheme) if qw.zero is None else qw.zero.float().unsqueeze(-1)
        w = ((codes - zero) * scale).view(n, -1)[:, :k]
    elif grid in FP8_DTYPES:
        w = (to_groups(qw.codes, g).view(FP8_DTYPES[grid]).float() * scale).view(n, -1)[:, :k]
    else:
        w = (codebook(grid).to(qw.codes.device)[to_groups(qw.codes, g).long()] * scale).view(n, -1)[:, :k]
    if qw.perm is not None:
        w = torch.empty_like(w).index_copy_(1, qw.perm.long(), w)
    if qw.transform is not None and "had_in" in qw.transform:    # incoherence: codes describe U W V^T
        w = undo_hadamard(w, qw.transform)
    if qw.transform is not None and "input_scale" in qw.transform:    # AWQ: codes describe W diag(1 / input_scale)
        w = w * qw.transform["input_scale"].float()
    return w.to(dtype)


# ---- double quantization of scales (QLoRA) -----------------------------------------------------------
def double_quantize(scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, G) positive scales -> 8-bit codes of (scale - mean) in flat blocks of DQ_BLOCK, each block with
    its own fp32 absmax, plus the fp32 mean (QLoRA's double quantization, with a linear symmetric 8-bit
    grid where bitsandbytes uses its dynamic 8-bit map). Storage: 8 + 32 / DQ_BLOCK bits per scale."""
    n, g = scale.shape
    c = scale.detach().float().reshape(-1)                           # (N*G,)
    offset = c.mean().reshape(1)                                     # (1,)
    d = torch.nn.functional.pad(c - offset, (0, (-c.numel()) % DQ_BLOCK)).view(-1, DQ_BLOCK)  # (B, 256)
    absmax = d.abs().amax(-1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))                       # (B,)
    q = torch.clamp(torch.round(d / (absmax.unsqueeze(-1) / 127)), -127, 127) + 128
    codes = q.reshape(-1)[: n * g].to(torch.uint8).view(n, g)
    return {"scale_codes": codes, "scale_absmax": absmax, "scale_offset": offset}


def double_dequantize(codes: torch.Tensor, absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The inverse of `double_quantize`: (N, G) fp32 scales, clamped positive (a group whose absmax sits far
    below the mean may round to <= 0; its weights are then ~0 relative to the rest anyway)."""
    n, g = codes.shape
    q = torch.nn.functional.pad(codes.reshape(-1).float() - 128, (0, absmax.numel() * DQ_BLOCK - n * g))
    c = (q.view(-1, DQ_BLOCK) * (absmax.float() / 127).unsqueeze(-1)).reshape(-1)[: n * g] + offset.float()
    return torch.clamp(c, min=torch.finfo(torch.float32).tiny).view(n, g)


def codebook_codes(w: torch.Tensor, scale: torch.Tensor, grid: str, g: int) -> torch.Tensor:
    """(N, K) weight, (N, G) scales -> (N, K) uint8 indices of the nearest `grid` codebook level of w / scale."""
    n, k = w.shape
    book = codebook(grid).to(w.device)
    mids = (book[1:] + book[:-1]) / 2
    codes = torch.bucketize(to_groups(w.float(), g) / scale.float().unsqueeze(-1), mids)    # (N, G, g)
    return codes.reshape(n, -1)[:, :k].to(torch.uint8)


# ---- orthogonal Hadamard transforms (incoherence processing) -----------------------------------------
@functools.lru_cache(maxsize=64)
def _hadamard_plan(n: int) -> tuple[torch.Tensor | None, int, int]:
    return hadamard_factors(n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim (a power of two): x @ H_p, Sylvester
    order (H_p is symmetric). log2(p) butterfly passes."""
    p = x.shape[-1]
    lead, h = x.shape[:-1], 1
    while h < p:
        a, b = x.reshape(*lead, p // (2 * h), 2, h).unbind(-2)
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """Orthonormal Q x along the last dim, Q = (I_b (x) H_d (x) H_p) / sqrt(d p) from `hadamard_factors`;
    `transpose` applies Q^T = Q^-1."""
    n = x.shape[-1]
    dense, p, blocks = _hadamard_plan(n)
    d = 1 if dense is None else dense.shape[0]
    y = fwht(x.reshape(*x.shape[:-1], blocks, d, p))                # (..., b, d, p)
    if dense is not None:
        m = dense.to(device=x.device, dtype=x.dtype)
        y = torch.matmul(m.t() if transpose else m, y)              # H_d along the d axis
    return (y * (1.0 / math.sqrt(d * p))).reshape(x.shape)


def random_hadamard(x: torch.Tensor, signs: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Q diag(signs) x along the last dim, or its inverse diag(signs) Q^T x. signs (n,) of +-1."""
    s = signs.to(device=x.device, dtype=x.dtype)
    return hadamard_transform(x, transpose=True) * s if inverse else hadamard_transform(x * s)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """(n,) +-1 -> (ceil(n / 8),) uint8, one bit per sign (1 = negative)."""
    return pack((signs < 0).to(torch.uint8).view(1, -1), 1).view(-1)


def unpack_signs(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_signs`: (n,) float32 of +-1."""
    return 1.0 - 2.0 * unpack(bits.view(1, -1), 1, n).view(-1).float()


def undo_hadamard(w: torch.Tensor, transform: dict[str, torch.Tensor]) -> torch.Tensor:
    """W = U^T W' V for W' = U W V^T with U = Q_N diag(had_out), V = Q_K diag(had_in): back to the
    original basis. (N, K) -> (N, K)."""
    n, k = w.shape
    w = random_hadamard(w.float(), unpack_signs(transform["had_in"], k), inverse=True)      # W' V
    return random_hadamard(w.t(), unpack_signs(transform["had_out"], n), inverse=True).t()  # U^T (.)
