"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023).

Activation outliers sit in a few input channels, so a per-tensor activation scale wastes most of its
levels. SmoothQuant divides channel j of the input by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and
multiplies the weights' column j by s_j: X W^T = (X diag(1/s)) (W diag(s))^T, an identity in float that
moves quantization difficulty from activations to weights (alpha = 0.5 splits it evenly). 1/s is folded
into the op that produced X exactly as AWQ's scales are (awq.py: the norm found by tracing, or the linear
named in LINEAR_FOLDS, each fold checked on the block's output). A group with no fold target (BERT's q/k/v
and FFN read a LayerNorm output that also feeds the residual; o_proj under GQA) is smoothed at run time
when `runtime` is set: the W8A8 module multiplies its input by 1/s inside the activation rounding
(nn_act.W8A8ScaledLinear), which costs nothing extra; otherwise it is left alone.

`alpha="auto"` picks each group's alpha from AUTO_GRID (or no smoothing) by the group's output error under
static W8A8 on the calibration rows the histogram kept, ||Q(X / s) Q(W diag(s))^T - X W^T||^2, as the
paper's and AWQ's grid searches do. Used through the w8a8 method (`smoothquant=alpha`), which calls
`transform_block` before quantizing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import BitsmithError
from ..observers import Histogram, clip_range
from .awq import _apply

# Per-group candidates of alpha="auto" (besides s = 1). Above 0.8 the calibration rows favour pushing nearly
# all range into the weights, which on MiniLM clipped unseen inputs badly (min cosine 0.88 with 0.9-1.0).
AUTO_GRID = (0.4, 0.5, 0.6, 0.7, 0.8)


def smooth_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (K,) = max|X_j|^alpha / max|W_:,j|^(1 - alpha) for the stacked weights w (N, K) of one group."""
    if not 0.0 <= alpha <= 1.0:
        raise BitsmithError(f"smoothquant alpha must lie in [0, 1], got {alpha}")
    a = act_absmax.float().clamp(min=1e-5)
    wmax = w.detach().float().abs().amax(0).to(a.device).clamp(min=1e-5)
    return (a.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)


def smoothed_hist(hist: Histogram, act_absmax: torch.Tensor, s: torch.Tensor) -> Histogram:
    """The histogram of X / s. Its bins come from the kept sample rows, but its largest |x| is exact:
    max over all rows of |x_ij| / s_j = max_j (max|X_j| / s_j), so min-max ranges see every calibration
    row."""
    h = hist.rescaled(s)
    bound = float((act_absmax.float() / s.to(act_absmax.device).float()).max())
    h.hi = max(h.hi, bound)          # clip_range's "minmax" is max(-lo, hi); the sign of the peak is unknown
    return h


def fake_w8a8(x: torch.Tensor, w: torch.Tensor, t: float, wmax: int) -> torch.Tensor:
    """x (T, K) W^T with x on a static symmetric int8 grid of range t (the modules' own quantize_act) and
    w (N, K) per output channel on [-wmax, wmax]: what a W8A8 module computes, in float."""
    from ..nn_act import QMAX, quantize_act     # here: nn_act -> nn -> nn_act at import time

    q, sx = quantize_act(x, torch.tensor([max(t, 1e-8) / QMAX]))
    xq = q * sx
    sw = (w.abs().amax(1, keepdim=True) / wmax).clamp(min=1e-12)
    return xq @ (torch.clamp(torch.round(w / sw), -wmax, wmax) * sw).t()


def search_alpha(stats: dict, w: torch.Tensor, *, grid=AUTO_GRID, observer: str = "minmax",
                 percentile: float = 99.99, wmax: int = 127) -> tuple[float | None, float]:
    """The alpha of `grid` (or None: no smoothing) with the least static-W8A8 output error of the stacked
    weights w (N, K) on the histogram's kept rows; returns (alpha, its error / the unsmoothed error)."""
    hist, amax = stats["act_hist"], stats["act_channel_absmax"]
    x = hist.rows.float()
    w = w.detach().float().to(x.device)
    ref = x @ w.t()

    def err(s: torch.Tensor | None) -> float:
        h = hist if s is None else smoothed_hist(hist, amax, s)
        t = clip_range(h, observer, percentile=percentile)
        xs, ws = (x, w) if s is None else (x / s, w * s)
        return float(((fake_w8a8(xs, ws, t, wmax) - ref) ** 2).sum())

    base = err(None)
    best, best_err = None, base
    for alpha in grid:
        e = err(smooth_scales(amax, w, alpha).to(x.device))
        if e < best_err:
            best, best_err = alpha, e
    return best, best_err / max(base, 1e-30)


def transform_block(block: nn.Module, groups: list, mods: dict[str, nn.Module], stats: dict[str, dict | None],
                    *, probe: Callable[[], torch.Tensor], alpha: float | str = 0.5, runtime: bool = False,
                    observer: str = "minmax", percentile: float = 99.99, wmax: int = 127,
                    info: dict[str, dict] | None = None, fold_tol: float | None = None
                    ) -> dict[str, dict | None]:
    """Smooth every group of float linears whose input has a fold target (or, with `runtime`, any group),
    in place and output-preserving. Returns stats for the smoothed inputs: channel absmax / s, histograms
    rebuilt from kept rows, and "input_scale" = 1/s where the module must apply it at run time."""
    if isinstance(alpha, str) and alpha != "auto":
        raise BitsmithError(f"smoothquant takes an alpha in [0, 1] or 'auto', got {alpha!r}")
    info = info if info is not None else {}
    stats = dict(stats)
    ref = probe()
    tol = fold_tol if fold_tol is not None else (1e-3 if ref.dtype == torch.float32 else 2e-2)
    for g in groups:
        first = stats.get(g.names[0])
        linears = [mods[n] for n in g.names]
        if first is None or "act_channel_absmax" not in first or not all(isinstance(m, nn.Linear) for m in linears):
            continue
        w = torch.cat([m.weight.detach() for m in linears])                    # (sum N, K)
        a = alpha
        if alpha == "auto":
            a, ratio = search_alpha(first, w, observer=observer, percentile=percentile, wmax=wmax)
            for n in g.names:
                info.setdefault(n, {}).update(smoothquant_alpha=a, smoothquant_err_ratio=round(ratio, 4))
            if a is None:
                for n in g.names:
                    info[n].update(smoothquant="none")
                continue
        s = smooth_scales(first["act_channel_absmax"], w, a)
        how = _apply(block, g, mods, s, probe, ref, tol, runtime_scale=runtime, who="SmoothQuant")
        for n in g.names:
            info.setdefault(n, {}).update(smoothquant=how)
        if how == "none":
            continue
        absmax = first["act_channel_absmax"]
        smoothed = {**first, "act_channel_absmax": absmax / s.to(absmax)}
        if "act_hist" in first:
            smoothed["act_hist"] = smoothed_hist(first["act_hist"], absmax, s.to(absmax))
        if how == "runtime":           # the float layers stay as they are: w8a8.quantize scales the weights
            smoothed["input_scale"] = 1.0 / s.to(absmax)
        for n in g.names:
            stats[n] = smoothed
    return stats
