"""W8A8: int8 per-channel weights and int8 activations (static per-tensor or dynamic per-token), run as an
integer matmul by nn_act.W8A8Linear / W8A8Conv2d.

Static activation scales come from calibration: the engine feeds each layer group's input to a histogram
observer (observers.Histogram) and `observer` picks the range: "minmax" (the largest |x| seen), "ema"
(moving average of per-batch min / max), "percentile" (99.99% of |x|), "mse" (least expected squared
error) or "entropy" (least KL divergence, TensorRT's calibrator); scale = T / 127. `dynamic` takes one
scale per token at run time instead (no range to calibrate, so it never clips). `smoothquant=alpha`
first migrates activation outliers into the weights (smoothquant.py); `smoothquant="auto"` searches alpha
per layer group on the group's output error. `smooth_runtime` (default: on for "auto") smooths groups that
have no fold target at run time (nn_act.W8A8ScaledLinear: the codes describe W diag(s), the module
multiplies its input by 1/s inside the activation rounding). `fp8=True` simulates e4m3
activations (scale T / 448) instead of int8. `reduce_range` stores weights in [-64, 64]: the single-pass
exact fbgemm product on CPUs without VNNI (kernels/cpu_w8a8.py), at one bit less weight precision.
`per_tensor` gives the weight one scale per tensor (max|W| / qmax, as many int4 deployments do) instead of
one per output channel; it is stored as equal per-channel scales, so the modules and formats are unchanged.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import BitsmithError
from ..numerics import FP8_MAX, float_dtype
from ..observers import CLIP_RULES, clip_range
from ..primitives import QWeight, quantize_weight, weight_qparams
from ..recipe import Scheme
from . import smoothquant as sq

log = logging.getLogger(__name__)
NEEDS: tuple[str, ...] = ("act_hist", "act_channel_absmax")
SEQUENTIAL = False


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, observer: str = "minmax",
             dynamic: bool = False, percentile: float = 99.99, fp8: bool = False, reduce_range: bool = False,
             per_tensor: bool = False, name: str = "weight", info: dict | None = None) -> QWeight:
    """int8 per-channel weight plus the activation scale its module applies (0 = dynamic per token)."""
    if observer not in CLIP_RULES:
        raise BitsmithError(f"unknown observer {observer!r}; valid: {', '.join(CLIP_RULES)}")
    runtime = None if stats is None else stats.get("input_scale")        # SmoothQuant's 1/s, applied at run time
    if runtime is not None:
        weight = weight.float() / runtime.to(weight.device, torch.float32)
    qw = int8_weight(weight, scheme, reduce_range=reduce_range, per_tensor=per_tensor, name=name)
    scale = 0.0
    if not dynamic:
        hist = None if stats is None else stats.get("act_hist")
        if hist is None:
            raise BitsmithError(f"{name}: static activation scales need calibration data reaching this layer; "
                                "use dynamic=True (--dynamic) or check the calibration inputs")
        t = clip_range(hist, observer, percentile=percentile)
        scale = max(t, 1e-8) / (FP8_MAX["fp8_e4m3"] if fp8 else 127.0)
        if info is not None:
            info.update(act_observer=observer, act_range=round(t, 5))
    key = "fp8_act_scale" if fp8 else "act_scale"
    transform = {key: torch.tensor([scale], dtype=torch.float32)}
    if runtime is not None:
        if fp8:
            raise BitsmithError(f"{name}: run-time smoothing is for int8 activations; use smooth_runtime=False "
                                "with fp8")
        transform["input_scale"] = runtime.to(weight.device, torch.float32)
    return dataclasses.replace(qw, transform=transform)


def weight_scheme(scheme: Scheme) -> Scheme:
    """Symmetric per output channel at the scheme's bits (8 = W8A8, 4 = W4A8) and scale dtype."""
    want = Scheme(bits=scheme.bits, group_size=None, symmetric=True, grid="int", scale_dtype=scheme.scale_dtype)
    if scheme.bits < 2 or scheme.grid != "int":
        raise BitsmithError(f"w8a8 weights are 2..8-bit integers, got {scheme.label()}")
    if (scheme.group_size, scheme.symmetric) != (None, True):
        log.info("w8a8: weights are symmetric per output channel; ignoring scheme %s", scheme.label())
    return want


def int8_weight(weight: torch.Tensor, scheme: Scheme, *, reduce_range: bool = False, per_tensor: bool = False,
                name: str = "weight") -> QWeight:
    """Symmetric per output channel; `reduce_range` (8 bits only) maps max|w| to 64 instead of 127;
    `per_tensor` uses the largest channel scale for every channel (one scale for the whole weight)."""
    s8 = weight_scheme(scheme)
    reduce = reduce_range and s8.bits == 8
    if not reduce and not per_tensor:
        return quantize_weight(weight, s8, name=name)
    scale, _ = weight_qparams(weight.float(), s8)
    scale = scale.float()
    if per_tensor:
        scale = torch.full_like(scale, float(scale.amax()))
    if reduce:
        scale = scale * (127.0 / 64.0)
    scale = scale.to(float_dtype(s8.scale_dtype))                                 # stored as the codes saw it
    return quantize_weight(weight, s8, scale=scale, name=name)


def transform_block(block, groups, mods, stats, scheme: Scheme, *, probe, smoothquant: float | str | None = None,
                    smooth_runtime: bool | None = None, observer: str = "minmax", percentile: float = 99.99,
                    reduce_range: bool = False, info: dict | None = None, **_) -> dict:
    """SmoothQuant before quantizing, when `smoothquant` (alpha or "auto") is given; otherwise nothing."""
    if smoothquant is None:
        return stats
    alpha = smoothquant if smoothquant == "auto" else float(smoothquant)
    runtime = (alpha == "auto") if smooth_runtime is None else bool(smooth_runtime)
    wmax = 64 if reduce_range and scheme.bits == 8 else (1 << (scheme.bits - 1)) - 1
    return sq.transform_block(block, groups, mods, stats, probe=probe, alpha=alpha, runtime=runtime,
                              observer=observer, percentile=percentile, wmax=wmax, info=info)
