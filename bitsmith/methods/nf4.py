"""NF4 / FP4 with double quantization (QLoRA, Dettmers et al. 2023), data-free.

Blockwise absmax: each block of `group_size` (64) weights is divided by its absolute maximum and rounded to
the nearest level of the NF4 codebook (the 16 quantiles of N(0, 1), numerics.NF4_CODEBOOK) or of FP4 e2m1.
Double quantization stores the absmax constants themselves as 8-bit codes of (absmax - mean) in blocks of
256, each with one fp32 absmax, so they cost 8 + 32/256 bits per block instead of 16: 4.127 bits per weight
at block 64. The codes are chosen for the double-quantized scales, exactly as stored.

The scales are bitsandbytes' absmax by default. `scale_search=True` lets each block's scale be absmax x f,
f in [min_factor, 1], whichever minimises the block's squared error (as llama.cpp's IQ4_NL does for its
NF4-like codebook): +0.5-0.7 dB of weight SQNR (enough to beat asymmetric RTN g64 on Gaussian weights,
which plain NF4 misses by 0.08 dB), but it clips the largest weights, and on SmolLM2-135M that costs
perplexity (27.46 against about 25.6 for absmax), as RTN's MSE clipping does. Same stored format either way.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import BitsmithError
from ..numerics import codebook, float_dtype
from ..primitives import (QWeight, check_finite, codebook_codes, double_dequantize, double_quantize,
                          group_mask, group_size_for, to_groups)
from ..recipe import Scheme

log = logging.getLogger(__name__)
NEEDS: tuple[str, ...] = ()   # data-free


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, double_quant: bool = True,
             scale_search: bool = False, min_factor: float = 0.7, steps: int = 13,
             name: str = "weight") -> QWeight:
    """NF4 (or FP4 with grid fp4) codes and block scales of a 2-D weight; an int scheme means NF4."""
    scheme = nf4_scheme(scheme)
    if weight.dim() != 2:
        raise BitsmithError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 0 < min_factor <= 1 or steps < 1:
        raise BitsmithError(f"nf4 needs 0 < min_factor <= 1 and steps >= 1, got {min_factor} and {steps}")
    check_finite(weight, name)
    w = weight.detach().float()
    g = group_size_for(w.shape[1], scheme.group_size)
    absmax = to_groups(w, g).abs().amax(-1)                                 # (N, G)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    if scale_search:
        absmax = search_scale(w, absmax, scheme.grid, g, min_factor=min_factor, steps=steps)
    if not double_quant:
        scale = absmax.to(float_dtype(scheme.scale_dtype))
        return QWeight(codebook_codes(w, scale.float(), scheme.grid, g), scale, None, scheme)
    dq = double_quantize(absmax)
    scale = double_dequantize(dq["scale_codes"], dq["scale_absmax"], dq["scale_offset"])   # (N, G) as stored
    return QWeight(codebook_codes(w, scale, scheme.grid, g), scale, None, scheme, transform=dq)


def search_scale(w: torch.Tensor, absmax: torch.Tensor, grid: str, g: int, *, min_factor: float = 0.7,
                 steps: int = 13) -> torch.Tensor:
    """Per block, the scale absmax x f (f from 1 down to min_factor in `steps` steps) with the least squared
    error of w against its nearest codebook levels. (N, G)"""
    n, k = w.shape
    wg = to_groups(w, g)                                                    # (N, G, g), zero padded
    book = codebook(grid).to(w.device)
    valid = group_mask(k, g, w.device)                                      # (G, g): padding is no error
    best, best_err = absmax, None
    for i in range(steps):
        f = 1.0 - (1.0 - min_factor) * i / max(steps - 1, 1)
        scale = absmax * f
        codes = codebook_codes(w, scale, grid, g)                           # (N, K)
        dq = book[to_groups(codes, g).long()] * scale.unsqueeze(-1)         # (N, G, g)
        err = (dq - wg).pow_(2).mul_(valid).sum(-1)                         # (N, G)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


def nf4_scheme(scheme: Scheme) -> Scheme:
    """The scheme this method quantizes with: grid nf4 unless fp4 was asked for, 4 bits, no zero point."""
    if scheme.grid in ("nf4", "fp4"):
        return scheme
    if scheme.grid != "int":
        raise BitsmithError(f"method nf4 quantizes to the nf4 or fp4 codebook, not grid {scheme.grid!r}")
    if scheme.bits != 4:
        log.info("nf4: codebooks are 4-bit; ignoring bits=%d", scheme.bits)
    return dataclasses.replace(scheme, grid="nf4", bits=4, symmetric=True)
