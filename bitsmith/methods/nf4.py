"""NF4 / FP4 with double quantization (QLoRA, Dettmers et al. 2023), data-free.

Blockwise absmax: each block of `group_size` (64) weights is divided by its absolute maximum and rounded to
the nearest level of the NF4 codebook (the 16 quantiles of N(0, 1), numerics.NF4_CODEBOOK) or of FP4 e2m1.
Double quantization stores the absmax constants themselves as 8-bit codes of (absmax - mean) in blocks of
256, each with one fp32 absmax, so they cost 8 + 32/256 bits per block instead of 16: 4.127 bits per weight
at block 64. The codes are chosen for the double-quantized scales, exactly as stored.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import BitsmithError
from ..primitives import (QWeight, check_finite, codebook_codes, double_dequantize, double_quantize,
                          group_size_for, quantize_weight, to_groups)
from ..recipe import Scheme

log = logging.getLogger(__name__)
NEEDS: tuple[str, ...] = ()   # data-free


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, double_quant: bool = True,
             name: str = "weight") -> QWeight:
    """NF4 (or FP4 with grid fp4) codes and absmax scales of a 2-D weight; an int scheme means NF4."""
    scheme = nf4_scheme(scheme)
    if not double_quant:
        return quantize_weight(weight, scheme, name=name)
    if weight.dim() != 2:
        raise BitsmithError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_finite(weight, name)
    w = weight.detach().float()
    g = group_size_for(w.shape[1], scheme.group_size)
    absmax = to_groups(w, g).abs().amax(-1)                                 # (N, G)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    dq = double_quantize(absmax)
    scale = double_dequantize(dq["scale_codes"], dq["scale_absmax"], dq["scale_offset"])   # (N, G) as stored
    return QWeight(codebook_codes(w, scale, scheme.grid, g), scale, None, scheme, transform=dq)


def nf4_scheme(scheme: Scheme) -> Scheme:
    """The scheme this method quantizes with: grid nf4 unless fp4 was asked for, 4 bits, no zero point."""
    if scheme.grid in ("nf4", "fp4"):
        return scheme
    if scheme.grid != "int":
        raise BitsmithError(f"method nf4 quantizes to the nf4 or fp4 codebook, not grid {scheme.grid!r}")
    if scheme.bits != 4:
        log.info("nf4: codebooks are 4-bit; ignoring bits=%d", scheme.bits)
    return dataclasses.replace(scheme, grid="nf4", bits=4, symmetric=True)
