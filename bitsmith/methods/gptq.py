"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023), after the reference IST-DASLab/gptq.

Minimises ||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X / T, one column at a time: each
column is rounded, and its rounding error, divided by the pivot of the upper Cholesky factor U of H^-1,
is pushed onto the not-yet-quantized columns along U's row (the optimal compensation of OBS). Updates are
applied lazily, 128 columns at a time. Act-order quantizes columns by decreasing H diagonal (the codes
then describe W[:, perm]); group parameters are taken when the solve reaches a group (or up front with
`static_groups`). Dead inputs are rounded, H is damped by a fraction of its mean diagonal, escalated
tenfold while the Cholesky factorisation fails, and round-to-nearest is the logged last resort.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import BitsmithError
from ..numerics import IntGrid, float_dtype
from ..primitives import (
    QWeight,
    check_finite,
    group_size_for,
    quantize_weight,
    symmetric_zero,
    weight_qparams,
)
from ..recipe import Scheme
from .rtn import mse_qparams

log = logging.getLogger(__name__)

NEEDS: tuple[str, ...] = ("hessian",)
SEQUENTIAL = True          # the engine observes and quantizes a block's layer groups in call order
LOW_BITS = 3               # at or below: act-order and MSE group parameters by default


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, damp: float = 0.01,
             block_size: int = 128, act_order: bool = False, static_groups: bool = False,
             mse: bool = False, name: str = "weight", info: dict | None = None) -> QWeight:
    """GPTQ-quantize `weight` (N, K) with stats["hessian"] (K, K); `info` receives damp / fallback. With
    `mse`, each group's (scale, zero) is RTN's MSE clipping search on the group's columns as the solve
    reaches them (the reference quantizer's `mse` option) instead of their min-max range. (The calibration
    engine starts from `scheme_defaults`: act-order always, static groups above 3 bits, mse at <= 3.)"""
    info = {} if info is None else info
    if scheme.grid != "int":
        raise BitsmithError(f"gptq quantizes to integer grids only, not {scheme.grid!r}; use rtn for it")
    if weight.dim() != 2:
        raise BitsmithError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if damp < 0 or block_size < 1:
        raise BitsmithError(f"gptq needs damp >= 0 and block_size >= 1, got {damp} and {block_size}")
    check_finite(weight, name)
    h = None if stats is None else stats.get("hessian")
    if h is None:
        return _fallback(weight, scheme, name, info, "no input statistics")
    k = weight.shape[1]
    if h.shape != (k, k):
        raise BitsmithError(f"{name}: hessian shape {tuple(h.shape)} does not match weight {tuple(weight.shape)}")
    w = weight.detach().to(h.device, torch.float32).clone()              # (N, K)
    h = h.float().clone()                                                # (K, K)
    if not torch.isfinite(h).all():
        return _fallback(weight, scheme, name, info, "non-finite input statistics")
    dead = torch.diag(h) == 0
    # An input that is always 0 in calibration: its column neither gives nor takes error updates (H is
    # block diagonal there) and is simply rounded. The reference zeroes such weights instead, which is
    # exact on the calibration data but wrong for inputs that were merely rare in it.
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    g = group_size_for(k, scheme.group_size)
    static = _static_qparams(w, scheme, mse) if static_groups or g == k else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u, used = inverse_cholesky(h, damp)          # LAPACK-sized work: all threads
    info["damp"] = used
    if u is None:
        return _fallback(weight, scheme, name, info, f"H + damp I is not positive definite up to damp {used:g}")
    if used != damp:
        log.warning("%s: Cholesky failed at damp %g; escalated to %g", name, damp, used)
        info["damp_escalated"] = True
    with one_thread_on_cpu(w.device):
        codes, scale, zero = solve(w, u, scheme, block_size=block_size, perm=perm, static=static, mse=mse)
    if not (torch.isfinite(scale).all() and (zero is None or torch.isfinite(zero).all())):
        return _fallback(weight, scheme, name, info, "the solve produced non-finite scales")
    if perm is not None and static is not None:
        # Group parameters follow the original columns: un-permute the codes and no perm is needed.
        codes = torch.empty_like(codes).index_copy_(1, perm, codes)
        perm = None
    sdt = float_dtype(scheme.scale_dtype)
    out_dev = weight.device
    return QWeight(codes.to(torch.uint8).to(out_dev), scale.to(sdt).to(out_dev),
                   None if zero is None else zero.to(out_dev), scheme,
                   None if perm is None else perm.to(torch.int32).to(out_dev))


def scheme_defaults(scheme: Scheme) -> dict:
    """Arguments the engine uses unless the recipe sets them. Act-order at every width (GPTQModel's
    desc_act default too): on SmolLM2 at 4 bits g64 it took dPPL from 0.71x RTN's to 0.42x (README, issue 3).
    Above 3 bits with static groups, so the codes are stored in the original column order with no
    permutation, which every export target (GGUF, MatMulNBits, compressed-tensors, MLX) loads. At <= 3 bits
    act-order with MSE group parameters chosen as the solve reaches them: the lowest held-out error on the
    SmolLM2 layers measured, and what met the 3-bit bar."""
    if scheme.bits <= LOW_BITS:
        return {"act_order": True, "mse": True}
    return {"act_order": True, "static_groups": True}


def damp_schedule(damp: float) -> list[float]:
    """The fractions of the mean diagonal tried in turn: damp, then x10 four times (from 0.01 when 0)."""
    return [damp, *(max(damp, 1e-3) * 10 ** i for i in range(1, 5))]


def inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor U of (H + d mean(diag H) I)^-1 with the first d of the schedule that works.
    Returns (U (K, K), d), or (None, last d tried)."""
    k = h.shape[0]
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    for d in damp_schedule(damp):
        u = upper_cholesky_of_inverse(h + d * mean_diag * eye)
        if u is not None:
            return u, d
    return None, d


def upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor | None:
    """U upper with U^T U = H^-1, from one factorisation: with J the reversal, J H J = L L^T gives
    H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper. None when H is not positive definite."""
    l, bad = torch.linalg.cholesky_ex(h.flip(0, 1))
    if bad != 0:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.solve_triangular(l, eye, upper=False).flip(0, 1)
    return u if bool(torch.isfinite(u).all()) else None


def _static_qparams(w: torch.Tensor, scheme: Scheme, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Group parameters of the original (unpermuted, not yet updated) weight. (N, G)"""
    return mse_qparams(w, scheme) if mse else weight_qparams(w, scheme)


def solve(w: torch.Tensor, u: torch.Tensor, scheme: Scheme, *, block_size: int = 128,
          perm: torch.Tensor | None = None,
          static: tuple[torch.Tensor, torch.Tensor | None] | None = None, mse: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GPTQ column loop on w (N, K) (already permuted when `perm` is given) with U (K, K).
    Returns codes (N, K) int32 in w's column order, scale and zero (N, G): per group of w's columns, or
    of the original columns when `static` parameters are given; `mse`: group parameters from RTN's MSE
    clipping search instead of min-max."""
    n, k = w.shape
    g = group_size_for(k, scheme.group_size)
    grid = IntGrid(scheme.bits, signed=False)
    per_row = dataclasses.replace(scheme, group_size=None)
    groups = -(-k // g)
    if static is not None:
        scale, zero = static[0].float(), static[1]
    else:
        scale = torch.ones(n, groups, device=w.device)
        zero = None if scheme.symmetric else torch.zeros(n, groups, device=w.device)
    sym_zero = symmetric_zero(scheme)
    qmax = float(grid.qmax)
    orig_col = perm.tolist() if perm is not None else range(k)          # on the host: no sync per column
    diag = u.diagonal().tolist()                                         # the pivots, also on the host
    wt = w.T.contiguous()               # (K, N): a column of w is a contiguous row here
    codes = torch.zeros(k, n, device=w.device)                           # (K, N) float codes, transposed at the end
    s_col = z_col = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]                                                   # (B, N), a view: updated in place
        err1 = torch.zeros_like(w1)                                      # (B, N)
        u1 = u[i1:i2, i1:i2]                                             # (B, B)
        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                gi = orig_col[j] // g
                s_col = scale[:, gi]
                z_col = sym_zero if zero is None else zero[:, gi]
            elif j % g == 0:
                # Parameters from the group's columns as they are now, every earlier column's error
                # included: columns past this block still owe it the lazy update, so apply it here.
                end = min(j + g, k)
                cols = wt[j:end]                                         # (g, N)
                if end > i2:
                    owed = wt[i2:end] - u[i1:j, i2:end].T @ err1[:i]
                    cols = torch.cat([wt[j:i2], owed])
                s_new, z_new = (mse_qparams if mse else weight_qparams)(cols.T, per_row)   # (N, 1)
                scale[:, j // g] = s_new[:, 0]
                s_col = scale[:, j // g]
                if zero is not None:
                    zero[:, j // g] = z_new[:, 0]
                z_col = sym_zero if zero is None else zero[:, j // g]
            # Per column as few tensor ops as possible: this loop runs K times and each op is tiny.
            # Same arithmetic as primitives.quantize / dequantize (divide by the scale, round, shift, clamp).
            col = w1[i]                                                  # (N,)
            q = torch.round(col / s_col).add_(z_col).clamp_(0.0, qmax)  # (N,) codes, as floats
            codes[j] = q
            err = col.sub((q - z_col).mul_(s_col)).div_(diag[j])         # (N,)
            if i + 1 < i2 - i1:                                          # the rest of the block (column i is done)
                w1[i + 1:].addr_(u1[i, i + 1:], err, alpha=-1.0)
            err1[i] = err
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)            # lazy batch update
    return codes.T.to(torch.int32).contiguous(), scale, zero


@contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The column loop's ops are tiny: an OpenMP fork/join per op costs more than it saves (on a busy
    2-core machine one thread ran the loop 30x faster)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fallback(weight: torch.Tensor, scheme: Scheme, name: str, info: dict, why: str) -> QWeight:
    log.warning("%s: GPTQ falls back to round-to-nearest (%s)", name, why)
    info["fallback"] = f"rtn: {why}"
    return quantize_weight(weight, scheme, name=name)
