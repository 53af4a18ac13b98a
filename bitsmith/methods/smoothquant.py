"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023).

Activation outliers sit in a few input channels, so a per-tensor activation scale wastes most of its
levels. SmoothQuant divides channel j of the input by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and
multiplies the weights' column j by s_j: X W^T = (X diag(1/s)) (W diag(s))^T, an identity in float that
moves quantization difficulty from activations to weights (alpha = 0.5 splits it evenly). 1/s is folded
into the op that produced X exactly as AWQ's scales are (awq.py: the norm found by tracing, or the linear
named in LINEAR_FOLDS, each fold checked on the block's output); a group with no fold target is left alone.
Used through the w8a8 method (`smoothquant=alpha`), which calls `transform_block` before quantizing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import BitsmithError
from .awq import _apply



def smooth_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (K,) = max|X_j|^alpha / max|W_:,j|^(1 - alpha) for the stacked weights w (N, K) of one group."""
    if not 0.0 <= alpha <= 1.0:
        raise BitsmithError(f"smoothquant alpha must lie in [0, 1], got {alpha}")
    a = act_absmax.float().clamp(min=1e-5)
    wmax = w.detach().float().abs().amax(0).to(a.device).clamp(min=1e-5)
    return (a.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)


def transform_block(block: nn.Module, groups: list, mods: dict[str, nn.Module], stats: dict[str, dict | None],
                    *, probe: Callable[[], torch.Tensor], alpha: float = 0.5, info: dict[str, dict] | None = None,
                    fold_tol: float | None = None) -> dict[str, dict | None]:
    """Smooth every group of float linears whose input has a fold target, in place and output-preserving.
    Returns stats for the smoothed inputs: channel absmax / s, and histograms rebuilt from kept rows."""
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
        s = smooth_scales(first["act_channel_absmax"], w, alpha)
        how = _apply(block, g, mods, s, probe, ref, tol, runtime_scale=False, who="SmoothQuant")
        for n in g.names:
            info.setdefault(n, {}).update(smoothquant=how)
        if how == "none":
            continue
        smoothed = {**first, "act_channel_absmax": first["act_channel_absmax"] / s.to(first["act_channel_absmax"])}
        if "act_hist" in first:
            smoothed["act_hist"] = first["act_hist"].rescaled(s)
        for n in g.names:
            stats[n] = smoothed
    return stats
