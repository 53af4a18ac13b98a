"""HQQ: Half-Quadratic Quantization (Badri & Shaji 2023, mobiusml/hqq `core/optimize.py`), data-free.

Minimise sum |W - Q^-1(Q(W))|^p (p < 1, robust to outliers) over each group's zero point z by half-quadratic
splitting: with W_e the error term, alternate (1) W_e = shrink_p(W - W_r, beta), the generalised soft
threshold of the l_p proximal step, and (2) z = mean(W_q - (W - W_e) / s), the closed-form zero; beta grows
by kappa each iteration. Optionally (`optimize_scale`) step (2) fits scale and zero together by least squares.
All groups are solved at once; iteration stops when the mean |error| stops falling, and each group keeps the
zero of its own best iteration. Scale and zero are then rounded to their storage dtypes and the codes chosen
for exactly those stored values.

At 3 bits and below (`integer_zero`, default on there) the zero point stays min-max's rounded integer and the
same half-quadratic iteration fits the scale instead (`hqq_qparams_integer_zero`). Why: a fractional zero
leaves w = 0 between two levels, so weights near zero get errors up to half a step; SmolLM2-135M has input
channels with activations ~100x the rest (second moments ~1e4 against a median of 0.02) whose weights are
tiny, and at 3 bits those errors dominated v_proj's and down_proj's output error (2.5x RTN's on v_proj),
giving perplexity 143 against RTN-3's 58. At 4 bits the step is small enough that HQQ's fractional zero
wins (as in the `hqq` package, whose results it matches to 0.3%).
"""

from __future__ import annotations

import logging

import torch

from ..errors import BitsmithError
from ..numerics import IntGrid, float_dtype
from ..primitives import QWeight, check_finite, group_mask, group_size_for, to_groups
from ..recipe import Scheme

log = logging.getLogger(__name__)
NEEDS: tuple[str, ...] = ()   # data-free


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, iters: int = 20, lp_norm: float = 0.7,
             beta: float = 10.0, kappa: float = 1.01, early_stop: bool = True, optimize_scale: bool = False,
             integer_zero: bool | None = None, scale_weight_power: float = 0.0, name: str = "weight") -> QWeight:
    """HQQ codes, scale and zero of a 2-D weight on an asymmetric integer grid. `integer_zero` (default: at 3
    bits and below) keeps the zero point an integer and optimises the scale instead, its least-squares step
    weighted by |w|^scale_weight_power (see the module doc and hqq_qparams_integer_zero)."""
    _check(weight, scheme, name, iters, lp_norm, beta, kappa)
    w = weight.detach().float()
    n, k = w.shape
    g = group_size_for(k, scheme.group_size)
    wg = to_groups(w, g)                                                   # (N, G, g)
    valid = group_mask(k, g, w.device).to(w.dtype)                         # (G, g) 1 for real columns
    if scheme.bits <= 3 if integer_zero is None else integer_zero:
        inv_scale, zero = hqq_qparams_integer_zero(wg, valid, scheme.bits, iters=iters, lp_norm=lp_norm, beta=beta,
                                                   kappa=kappa, early_stop=early_stop, power=scale_weight_power)
    else:
        inv_scale, zero = hqq_qparams(wg, valid, scheme.bits, iters=iters, lp_norm=lp_norm, beta=beta, kappa=kappa,
                                      early_stop=early_stop, optimize_scale=optimize_scale)
    # Round to what is stored (scale at scheme.scale_dtype, zero at float16), then pick codes for those.
    scale = (1.0 / inv_scale).to(float_dtype(scheme.scale_dtype)).float()  # (N, G)
    zero = zero.to(torch.float16).float()                                  # (N, G)
    qmax = IntGrid(scheme.bits).qmax
    codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, qmax)
    codes = codes.reshape(n, -1)[:, :k].to(torch.uint8)                    # (N, K)
    return QWeight(codes, scale.to(float_dtype(scheme.scale_dtype)), zero, scheme)


def hqq_qparams(wg: torch.Tensor, valid: torch.Tensor, bits: int, *, iters: int = 20, lp_norm: float = 0.7,
                beta: float = 10.0, kappa: float = 1.01, early_stop: bool = True,
                optimize_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimiser on grouped weights wg (N, G, g) with `valid` (G, g) masking a ragged last group.
    Returns (inverse scale, zero), each (N, G): w ~ (q - z) / inv_scale, q = round(w * inv_scale + z).
    Written as few full passes over wg per iteration as possible (about 14): it is memory-bound on CPU."""
    qmax = float((1 << bits) - 1)
    ragged = bool((valid == 0).any())
    count = valid.sum(-1, keepdim=True)                                    # (G, 1) real columns per group
    big = torch.finfo(wg.dtype).max
    wmin = (torch.where(valid > 0, wg, big) if ragged else wg).amin(-1, keepdim=True)   # (N, G, 1)
    wmax = (torch.where(valid > 0, wg, -big) if ragged else wg).amax(-1, keepdim=True)
    denom = wmax - wmin
    # HQQ's start: min-max on the unsigned grid; 4-bit starts from a rounded zero as the package does.
    s = torch.where(denom > 1e-4, qmax / denom, torch.ones_like(denom)).clamp(max=2e4)   # inverse scale
    z = -wmin * s
    if bits == 4:
        z = torch.round(z)
    mean_w = wg.sum(-1, keepdim=True) / count                              # padding is 0: exact
    best_z, best_s = z.clone(), s.clone()
    best_err = torch.full_like(z, float("inf"))
    prev = float("inf")
    for i in range(iters):
        wq = (wg * s).add_(z).round_().clamp_(0, qmax)                    # (N, G, g) codes
        e = (wq - z).mul_(-1.0 / s).add_(wg)                               # W - W_r
        if ragged:
            e.mul_(valid)
        abs_e = e.abs()
        err = abs_e.sum(-1, keepdim=True) / count                          # (N, G, 1) mean |e|
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_z, best_s = torch.where(better, z, best_z), torch.where(better, s, best_s)
        total = float(err.mean())
        if early_stop and total >= prev:
            log.debug("hqq: stop at iteration %d, mean |error| %.3g", i, total)
            break
        prev = total
        # W_e = shrink(e) is exactly 0 wherever |e| <= beta^(1 / (p - 2)); for LLM weights (|e| ~ 1e-3 against
        # a threshold ~ 0.17 at beta 10) that is everywhere, and skipping the pow is most of the speed.
        active = float(abs_e.amax()) > beta ** (1.0 / (lp_norm - 2.0))
        we = _shrink_lp_(e, beta, lp_norm) if active else None             # (N, G, g) or None for 0
        if optimize_scale:
            s, z = _fit_affine(wq, wg if we is None else wg - we, valid, count, s, z)
        else:
            # z = mean(W_q - (W - W_e) s) per group, with mean(W) precomputed
            mean_q = (wq.mul_(valid) if ragged else wq).sum(-1, keepdim=True) / count
            mean_we = 0.0 if we is None else we.sum(-1, keepdim=True) / count
            z = mean_q - (mean_w - mean_we) * s
        beta *= kappa
    log.debug("hqq: %d iterations", i + 1)
    return best_s.squeeze(-1), best_z.squeeze(-1)


def hqq_qparams_integer_zero(wg: torch.Tensor, valid: torch.Tensor, bits: int, *, iters: int = 20,
                             lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, early_stop: bool = True,
                             power: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's half-quadratic splitting with the zero point held at min-max's rounded integer, so w = 0 stays
    exactly on the grid, and the scale as the variable: alternate W_e = shrink_p(W - W_r, beta) and the
    closed-form scale of (W - W_e) ~ scale (W_q - z) by least squares, optionally weighted by |w|^power (power
    > 0 favours a group's few large weights; the default 0 measured best on SmolLM2). Each group keeps its
    iteration with the least (weighted) squared error. Same (N, G, g) inputs and (inverse scale, zero) outputs
    as hqq_qparams."""
    qmax = float((1 << bits) - 1)
    ragged = bool((valid == 0).any())
    big = torch.finfo(wg.dtype).max
    wmin = (torch.where(valid > 0, wg, big) if ragged else wg).amin(-1, keepdim=True)   # (N, G, 1)
    wmax = (torch.where(valid > 0, wg, -big) if ragged else wg).amax(-1, keepdim=True)
    denom = wmax - wmin
    s = torch.where(denom > 1e-4, qmax / denom, torch.ones_like(denom)).clamp(max=2e4)   # inverse scale
    z = torch.round(-wmin * s)                                             # fixed from here on
    imp = wg.abs().pow(power) if power > 0 else valid.expand_as(wg)        # (N, G, g); padding weighs 0
    best_s, best_err = s.clone(), torch.full_like(s, float("inf"))
    prev = float("inf")
    for i in range(iters):
        c = (wg * s).add_(z).round_().clamp_(0, qmax).sub_(z)             # (N, G, g) code - zero
        e = wg - c / s                                                     # W - W_r
        err = (e.pow(2) * imp).sum(-1, keepdim=True)                       # (N, G, 1)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
        total = float(err.sum())
        if early_stop and total >= prev:
            break
        prev = total
        active = float(e.abs().amax()) > beta ** (1.0 / (lp_norm - 2.0))
        target = wg - _shrink_lp_(e, beta, lp_norm) if active else wg      # W - W_e
        ci = c * imp
        a = (ci * target).sum(-1, keepdim=True) / (ci * c).sum(-1, keepdim=True).clamp(min=1e-30)
        s = torch.where(a > 0, 1.0 / a.clamp(min=1e-12), s).clamp(max=2e4)  # scale = a, stored inverted
        beta *= kappa
    log.debug("hqq (integer zero): %d iterations", i + 1)
    return best_s.squeeze(-1), z.squeeze(-1)


def _shrink_lp_(e: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold, the proximal step of |x|^p, computed in e's memory:
    sign(e) relu(|e| - |e|^(p-1) / beta) = e relu(1 - |e|^(p-2) / beta) (0 where e = 0)."""
    t = e.abs()
    t = t.pow_(p - 2) if p != 1 else t.reciprocal_()
    t.mul_(-1.0 / beta).add_(1.0).clamp_(min=0.0)
    return e.mul_(t)


def _fit_affine(wq: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares target ~ a wq + b per group, as inverse scale 1/a and zero -b/a; keeps (s, z) where the
    fit degenerates (constant codes, or a non-positive slope)."""
    c = count                                                              # (G, 1)
    mq = (wq * valid).sum(-1, keepdim=True) / c
    mt = (target * valid).sum(-1, keepdim=True) / c
    dq = (wq - mq) * valid
    var = dq.pow(2).sum(-1, keepdim=True)
    a = (dq * (target - mt)).sum(-1, keepdim=True) / var.clamp(min=1e-12)
    ok = (var > 1e-12) & (a > 0)
    a_safe = torch.where(ok, a, torch.ones_like(a))
    return torch.where(ok, 1.0 / a_safe, s), torch.where(ok, mq - mt / a_safe, z)


def _check(w: torch.Tensor, scheme: Scheme, name: str, iters: int, lp_norm: float, beta: float,
           kappa: float) -> None:
    if w.dim() != 2:
        raise BitsmithError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    check_finite(w, name)
    if scheme.grid != "int" or scheme.symmetric:
        raise BitsmithError(f"hqq optimises the zero point of an asymmetric int grid; got {scheme.label()}")
    if not (0 < lp_norm <= 1):
        raise BitsmithError(f"hqq lp_norm must be in (0, 1], got {lp_norm}")
    if iters < 1 or beta <= 0 or kappa < 1:
        raise BitsmithError(f"hqq needs iters >= 1, beta > 0 and kappa >= 1; got {iters}, {beta}, {kappa}")
