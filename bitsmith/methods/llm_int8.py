"""LLM.int8() (Dettmers et al. 2022, "8-bit Matrix Multiplication for Transformers at Scale"), data-free.

Weights: int8, one absmax scale per output row (symmetric, codes -127..127 stored unsigned as q + 128).
At run time (nn.Int8MixedLinear) the input columns holding any |x| > threshold (6.0) are the "emergent
outlier features": they go through a float matmul with their weight columns, while every other column is
quantized per token (absmax / 127) and multiplied int8 x int8 -> int32 (torch._int_mm on CUDA, an exact
reference elsewhere), then rescaled by the token and row scales. The result: int8 weights without the
accuracy collapse of plain int8 activations on models with outlier features.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import BitsmithError
from ..primitives import QWeight, quantize_weight
from ..recipe import Scheme

log = logging.getLogger(__name__)
NEEDS: tuple[str, ...] = ()   # data-free: outliers are found per forward pass, not calibrated


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, threshold: float = 6.0,
             name: str = "weight") -> QWeight:
    """Row-wise int8 weight plus the outlier threshold the run-time module applies."""
    if not threshold > 0:
        raise BitsmithError(f"llm_int8 threshold must be positive (inf disables the outlier path), got {threshold}")
    qw = quantize_weight(weight, int8_scheme(scheme), name=name)
    return dataclasses.replace(qw, transform={"outlier_threshold": torch.tensor([float(threshold)])})


def int8_scheme(scheme: Scheme) -> Scheme:
    """LLM.int8()'s fixed weight format: 8-bit symmetric, one scale per output row (kept at scheme's
    scale dtype)."""
    want = Scheme(bits=8, group_size=None, symmetric=True, grid="int", scale_dtype=scheme.scale_dtype)
    if (scheme.bits, scheme.group_size, scheme.symmetric, scheme.grid) != (8, None, True, "int"):
        log.info("llm_int8: weights are int8 per-row symmetric; ignoring scheme %s", scheme.label())
    return want
