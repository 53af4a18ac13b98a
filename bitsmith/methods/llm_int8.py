"""LLM.int8() (Dettmers et al. 2022, "8-bit Matrix Multiplication for Transformers at Scale"), data-free.

Weights: int8, one absmax scale per output row (symmetric, codes -127..127 stored unsigned as q + 128).
At run time (nn.Int8MixedLinear) the input columns holding any |x| > threshold (6.0) are the "emergent
outlier features": they go through a float matmul with their weight columns, while every other column is
quantized per token to int8 and multiplied int8 x int8 -> int32 (torch._int_mm on CUDA, an exact reference
elsewhere), then rescaled by the token and row scales. The result: int8 weights without the accuracy
collapse of plain int8 activations on models with outlier features.

The per-token activation quantization is one of the paper's two (its Table 1 has both with the
decomposition): `activations="zeropoint"` (default; asymmetric, each token's [min, max] over 256 codes and an
integer zero point, Int8ZeroPointLinear) or `"absmax"` (symmetric, absmax / 127: what bitsandbytes'
Linear8bitLt runs, Int8MixedLinear). Zeropoint is the default because on SmolLM2-135M the q/k/v inputs carry
a channel that sets many tokens' range, of one sign within a layer and under the threshold: absmax leaves
the codes of the other sign largely unused. On the calibration split LLM.int8() lost 1.6%
perplexity with absmax and 0.7% with zero points (README, issue 5). Weights stay int8 absmax per row in both.
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
ACTIVATIONS = ("zeropoint", "absmax")


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, threshold: float = 6.0,
             activations: str = "zeropoint", name: str = "weight") -> QWeight:
    """Row-wise int8 weight plus what the run-time module applies: the outlier threshold and, for zeropoint
    activations, the marker that selects Int8ZeroPointLinear."""
    if not threshold > 0:
        raise BitsmithError(f"llm_int8 threshold must be positive (inf disables the outlier path), "
                            f"got {threshold}")
    if activations not in ACTIVATIONS:
        raise BitsmithError(f"llm_int8 activations must be one of {', '.join(ACTIVATIONS)}, "
                            f"got {activations!r}")
    qw = quantize_weight(weight, int8_scheme(scheme), name=name)
    transform = {"outlier_threshold": torch.tensor([float(threshold)])}
    if activations == "zeropoint":
        transform["act_zero_point"] = torch.ones(1, dtype=torch.uint8)
    return dataclasses.replace(qw, transform=transform)


def int8_scheme(scheme: Scheme) -> Scheme:
    """LLM.int8()'s fixed weight format: 8-bit symmetric, one scale per output row (kept at scheme's
    scale dtype)."""
    want = Scheme(bits=8, group_size=None, symmetric=True, grid="int", scale_dtype=scheme.scale_dtype)
    if (scheme.bits, scheme.group_size, scheme.symmetric, scheme.grid) != (8, None, True, "int"):
        log.info("llm_int8: weights are int8 per-row symmetric; ignoring scheme %s", scheme.label())
    return want
