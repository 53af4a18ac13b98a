"""NF4 / FP4 with double quantization (QLoRA, Dettmers et al. 2023), data-free.

Blockwise absmax: each block of `group_size` (64) weights is divided by its absolute maximum and rounded to
the nearest level of the NF4 codebook (the 16 quantiles of N(0, 1), numerics.NF4_CODEBOOK) or of FP4 e2m1.
Double quantization stores the absmax constants themselves as 8-bit codes of (absmax - mean) in blocks of
256, each with one fp32 absmax, so they cost 8 + 32/256 bits per block instead of 16: 4.127 bits per weight
at block 64. The codes are chosen for the double-quantized scales, exactly as stored.

The stored format is bitsandbytes' (codes, one scale per block, 8-bit double-quantized scales); only the
choice of each block's scale differs. By default (`scale_search=True`) each block's scale is absmax x f,
f in [min_factor, 1], whichever minimises the block's squared error weighted by w^2 (`search_power`), as
llama.cpp does for its NF4-like IQ4_NL codebook when it has no importance matrix: +0.4 dB of weight SQNR,
enough to beat asymmetric RTN g64 on Gaussian weights (21.17 against 20.81 dB; bitsandbytes' plain absmax
gets 20.73). The weighting matters: an unweighted search (`search_power=0`) gains 0.1 dB more SQNR but
clips the largest weight of many blocks, and in SmolLM2-135M a few large weights in layer 11's down_proj
read the model's massive activation channels (input second moments ~1e4 against a median of 0.02); clipping
them doubled that layer's output error and cost perplexity (27.46 against 25.48 for absmax). Weighting by
w^2 keeps those weights and lowers that layer's error below absmax's. `scale_search=False` is bitsandbytes'
absmax exactly.
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
             scale_search: bool = True, min_factor: float = 0.7, steps: int = 13, search_power: float = 2.0,
             name: str = "weight") -> QWeight:
    """NF4 (or FP4 with grid fp4) codes and block scales of a 2-D weight; an int scheme means NF4."""
    scheme = nf4_scheme(scheme)
    if weight.dim() != 2:
        raise BitsmithError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 0 < min_factor <= 1 or steps < 1 or not search_power >= 0:
        raise BitsmithError(f"nf4 needs 0 < min_factor <= 1, steps >= 1 and search_power >= 0, got {min_factor}, "
                            f"{steps} and {search_power}")
    check_finite(weight, name)
    w = weight.detach().float()
    g = group_size_for(w.shape[1], scheme.group_size)
    absmax = to_groups(w, g).abs().amax(-1)                                 # (N, G)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    if scale_search:
        absmax = search_scale(w, absmax, scheme.grid, g, min_factor=min_factor, steps=steps, power=search_power)
    if not double_quant:
        scale = absmax.to(float_dtype(scheme.scale_dtype))
        return QWeight(codebook_codes(w, scale.float(), scheme.grid, g), scale, None, scheme)
    dq = double_quantize(absmax)
    scale = double_dequantize(dq["scale_codes"], dq["scale_absmax"], dq["scale_offset"])   # (N, G) as stored
    return QWeight(codebook_codes(w, scale, scheme.grid, g), scale, None, scheme, transform=dq)


def search_scale(w: torch.Tensor, absmax: torch.Tensor, grid: str, g: int, *, min_factor: float = 0.7,
                 steps: int = 13, power: float = 2.0) -> torch.Tensor:
    """Per block, the scale absmax x f (f from 1 down to min_factor in `steps` steps) with the least
    sum |w|^power (w - Q(w))^2 against the nearest codebook levels (power 0: plain squared error). (N, G)"""
    n, k = w.shape
    wg = to_groups(w, g)                                                    # (N, G, g), zero padded
    u = wg / absmax.unsqueeze(-1)                                           # blocks in absmax units, |u| <= 1
    book = codebook(grid).to(w.device)
    mids = (book[1:] + book[:-1]) / 2
    # |w|^power weights the error toward the large weights (padding is 0, so it adds no error either way).
    # Errors are compared in absmax units: a per-block constant factor, so the same argmin.
    weight = wg.abs().pow(power) if power > 0 else group_mask(k, g, w.device).expand_as(wg)   # (N, G, g)
    best_f, best_err = torch.ones_like(absmax), None
    for i in range(steps):
        f = 1.0 - (1.0 - min_factor) * i / max(steps - 1, 1)
        q = book[torch.bucketize(u / f, mids)] * f                         # nearest level, in absmax units
        err = (q - u).pow_(2).mul_(weight).sum(-1)                          # (N, G)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_f = torch.where(better, f, best_f)
    return absmax * best_f


def nf4_scheme(scheme: Scheme) -> Scheme:
    """The scheme this method quantizes with: grid nf4 unless fp4 was asked for, 4 bits, no zero point."""
    if scheme.grid in ("nf4", "fp4"):
        return scheme
    if scheme.grid != "int":
        raise BitsmithError(f"method nf4 quantizes to the nf4 or fp4 codebook, not grid {scheme.grid!r}")
    if scheme.bits != 4:
        log.info("nf4: codebooks are 4-bit; ignoring bits=%d", scheme.bits)
    return dataclasses.replace(scheme, grid="nf4", bits=4, symmetric=True)
