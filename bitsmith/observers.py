"""Streaming statistics of a layer's inputs, one calibration batch at a time, in float32.

A layer's inputs are first flattened to rows of features (`features`): a Linear's (..., K) becomes (T, K);
a Conv2d's input is unfolded into its patches, (B * L, C * kh * kw), the layout of its flattened weight.
Observers keep running means, so the result does not depend on how the data was batched:
  "hessian"      H = mean_t x_t x_t^T  (K, K): the second moment that GPTQ's proxy loss and AWQ's
                 output error ||X W^T - X Q^T||^2 / T = tr((W - Q) H (W - Q)^T) are built on
  "act_absmean"  mean_t |x_t|  (K,): AWQ's per-input-channel activation magnitude
Methods name what they need in `NEEDS`; `make_observers` builds exactly those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BitsmithError


class SecondMoment:
    """Running mean of x x^T over rows. (K, K)

    x^T x is symmetric: for K >= 2 * TILE only the tiles on and above the diagonal are computed (a
    symmetric rank-k update in GEMM-sized pieces: 4 tiles of 6 cost 21/36 of the full product) and
    `result` mirrors them. The tiles are large enough that each GEMM still runs at full speed."""

    TILE = 256

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.count = 0
        n = -(-k // self.TILE) if k >= 2 * self.TILE else 1
        edges = [round(i * k / n) for i in range(n + 1)]                 # n near-equal tiles
        self.tiles = list(zip(edges[:-1], edges[1:]))
        self.mirrored = True

    def update(self, x: torch.Tensor) -> None:            # x: (T, K)
        x = x.to(self.mean.device, torch.float32)
        t = x.shape[0]
        if t == 0:
            return
        total = self.count + t
        # Rescale the old mean instead of summing: the magnitude stays O(x^2) for any number of tokens.
        if len(self.tiles) == 1:
            self.mean.mul_(self.count / total).addmm_(x.T, x, alpha=1.0 / total)
        else:
            xt = x.T
            for a, b in self.tiles:
                rows = self.mean[a:b, a:]                                  # (b - a, K - a) on/above the diagonal
                rows.mul_(self.count / total).addmm_(xt[a:b], x[:, a:], alpha=1.0 / total)
            self.mirrored = False
        self.count = total

    def result(self) -> torch.Tensor:
        if not self.mirrored:
            for a, b in self.tiles[1:]:
                self.mean[a:b, :a] = self.mean[:a, a:b].T                  # the lower tiles from the upper
            self.mirrored = True
        return self.mean


class AbsMean:
    """Running mean of |x| per feature. (K,)"""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(k, dtype=torch.float32, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:            # x: (T, K)
        t = x.shape[0]
        if t == 0:
            return
        total = self.count + t
        s = x.to(self.mean.device, torch.float32).abs().sum(0)
        self.mean.mul_(self.count / total).add_(s, alpha=1.0 / total)
        self.count = total

    def result(self) -> torch.Tensor:
        return self.mean


class MinMax:
    """Running minimum and maximum over all values (per tensor): the range a static activation scale
    must cover (min-max calibration of W8A8 activations). `k` is accepted for make_observers' signature."""

    def __init__(self, k: int = 0, device: torch.device | str = "cpu") -> None:
        self.lo = torch.full((), float("inf"), device=device)
        self.hi = torch.full((), float("-inf"), device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:            # x: any shape
        if x.numel() == 0:
            return
        x = x.detach().to(self.lo.device, torch.float32)
        self.lo = torch.minimum(self.lo, x.amin())
        self.hi = torch.maximum(self.hi, x.amax())
        self.count += x.numel() // max(x.shape[-1], 1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise BitsmithError("a min-max observer saw no data; run calibration inputs through the layer")
        return self.lo, self.hi


OBSERVERS = {"hessian": SecondMoment, "act_absmean": AbsMean, "act_minmax": MinMax}


def input_ranges(modules: dict[str, nn.Module], run, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (min, max)} of each module's input over `run(batch)` for every batch: forward pre-hooks
    feed one MinMax per module (static per-tensor activation ranges; modules never reached are left out)."""
    obs = {name: MinMax() for name in modules}
    hooks = [m.register_forward_pre_hook(lambda _m, args, o=obs[name]: o.update(args[0]))
             for name, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                run(batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: o.result() for name, o in obs.items() if o.count}


def make_observers(needs: tuple[str, ...], k: int, device: torch.device | str = "cpu") -> dict:
    unknown = [n for n in needs if n not in OBSERVERS]
    if unknown:
        raise BitsmithError(f"unknown statistic(s) {', '.join(unknown)}; known: {', '.join(OBSERVERS)}")
    return {n: OBSERVERS[n](k, device) for n in needs}


def in_features(mod: nn.Module) -> int:
    """K, the number of columns of the module's flattened (N, K) weight."""
    w = mod.weight
    return w[0].numel()


def observable(mod: nn.Module) -> bool:
    """Whether `features` can turn this module's input into rows matching its flattened weight."""
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and not isinstance(mod.padding, str))


def features(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module input as rows of its weight's input features: (T, K)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])                                  # (T, K)
    if isinstance(mod, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])             # (B * L, C * kh * kw)
    raise BitsmithError(f"cannot observe the inputs of a {type(mod).__name__}")
