"""Shared test helpers: SQNR, the debugging currency for quantizers."""

from __future__ import annotations

import math

import torch


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of approximation y to reference x, in dB (inf when equal)."""
    x, y = x.double(), y.double()
    noise = (x - y).pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(x.pow(2).sum().item() / noise)
