"""Round-to-nearest (RTN): min-max scale and zero point per group, optionally with an MSE clipping search.

The clipping search (as in GPTQ's reference quantizer) tries ranges shrunk by factors 1.0, 0.99, ... down to
`min_shrink`, and keeps per group the one with the smallest |w - Q(w)|^norm; it helps most at 2-4 bits,
where one outlier otherwise stretches the grid of its whole group.
"""

from __future__ import annotations

import torch

from ..primitives import QWeight, group_size_for, quantize_weight, symmetric_zero, to_groups, weight_qparams
from ..recipe import Scheme

NEEDS: tuple[str, ...] = ()   # data-free


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, mse: bool = False,
             grid_points: int = 50, min_shrink: float = 0.5, norm: float = 2.4, name: str = "weight") -> QWeight:
    if not mse or scheme.grid != "int":
        return quantize_weight(weight, scheme, name=name)
    scale, zero = mse_qparams(weight, scheme, grid_points=grid_points, min_shrink=min_shrink, norm=norm)
    return quantize_weight(weight, scheme, scale=scale, zero=zero, name=name)


def mse_qparams(w: torch.Tensor, scheme: Scheme, *, grid_points: int = 50, min_shrink: float = 0.5,
                norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group (scale, zero) minimising the group's |w - Q(w)|^norm over shrunk min-max ranges."""
    w = w.detach().float()
    g = group_size_for(w.shape[1], scheme.group_size)
    wg = to_groups(w, g)                                                  # (N, G, g), zero-padded
    qmax = float((1 << scheme.bits) - 1)
    best_scale, best_zero = weight_qparams(w, scheme)
    best_err = torch.full(best_scale.shape, float("inf"), device=w.device)
    steps = max(1, int(round((1 - min_shrink) * grid_points)))
    for i in range(steps + 1):
        scale, zero = weight_qparams(w, scheme, 1.0 - i / grid_points)    # (N, G) each
        z = torch.full_like(scale, symmetric_zero(scheme)) if zero is None else zero
        s3, z3 = scale.unsqueeze(-1), z.unsqueeze(-1)
        q = torch.clamp(torch.round(wg / s3) + z3, 0.0, qmax)
        err = ((q - z3) * s3 - wg).abs_().pow_(norm).sum(-1)             # (N, G); padding adds 0
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
