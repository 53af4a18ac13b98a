"""Incoherence processing with random-sign Hadamard transforms (QuIP#, Tseng et al. 2024), data-free form.

An orthogonal U = Q_N diag(s_out), V = Q_K diag(s_in) (Q a normalised Hadamard, s random signs) turns W into
W' = U W V^T, whose entries are spread evenly ("incoherent"): no outlier weight stretches a group's grid, so
low-bit rounding loses less. W' is quantized (RTN here; `quip` = the same with GPTQ, the Hessian taken to
V H V^T), and since W = U^T W' V the layer runs as y = U^T (W' (V x)): HadamardLinear applies V to the input
and U^T to the output, each a fast Walsh-Hadamard. Widths that are not powers of two use a Kronecker factor
(numerics.hadamard_factors: 576 = 36 x 16, 1536 = 12 x 128).
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from ..errors import BitsmithError
from ..primitives import QWeight, check_finite, pack_signs, random_hadamard
from ..recipe import Scheme
from . import rtn

NEEDS: tuple[str, ...] = ()   # data-free


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, seed: int = 0, name: str = "weight",
             **rtn_args) -> QWeight:
    """RTN codes of U W V^T (any RTN option, e.g. mse=True, passes through) with the signs of U and V."""
    if weight.dim() != 2:
        raise BitsmithError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_finite(weight, name)
    s_in, s_out = layer_signs(weight.shape[1], weight.shape[0], seed, name)
    qw = rtn.quantize(transform_weight(weight.float(), s_in, s_out), None, scheme, name=name, **rtn_args)
    return with_signs(qw, s_in, s_out)


def layer_signs(k: int, n: int, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random +-1 signs (K,) and (N,) for one layer, fixed by (seed, layer name) whatever the layer order."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    signs = torch.randint(0, 2, (k + n,), generator=gen).float() * 2 - 1
    return signs[:k], signs[k:]


def transform_weight(w: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """W' = U W V^T. (N, K) -> (N, K)."""
    wv = random_hadamard(w, s_in)                          # rows: V w  =  W V^T
    return random_hadamard(wv.t(), s_out).t().contiguous()  # columns: U (.)


def transform_hessian(h: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """The Hessian of the transformed inputs V x: V H V^T. (K, K) -> (K, K)."""
    hv = random_hadamard(h.float(), s_in)                  # H V^T (rows)
    return random_hadamard(hv.t(), s_in).t().contiguous()  # V (.)


def with_signs(qw: QWeight, s_in: torch.Tensor, s_out: torch.Tensor) -> QWeight:
    """Attach the packed signs: dequantize_weight then undoes the transforms, HadamardLinear applies them."""
    extra = {"had_in": pack_signs(s_in), "had_out": pack_signs(s_out)}
    return dataclasses.replace(qw, transform={**(qw.transform or {}), **extra})
