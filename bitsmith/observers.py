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
    """Running mean of x x^T over rows. (K, K)"""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:            # x: (T, K)
        x = x.to(self.mean.device, torch.float32)
        t = x.shape[0]
        if t == 0:
            return
        total = self.count + t
        # Rescale the old mean instead of summing: the magnitude stays O(x^2) for any number of tokens.
        self.mean.mul_(self.count / total).addmm_(x.T, x, alpha=1.0 / total)
        self.count = total

    def result(self) -> torch.Tensor:
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


OBSERVERS = {"hessian": SecondMoment, "act_absmean": AbsMean}


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
