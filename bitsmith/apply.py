"""`quantize(model, recipe)`: select modules, run the recipe's method on each weight, swap in packed modules.

Data-free methods (NEEDS empty) quantize module by module; calibrated methods go through calibrate.py.
Everything left in floating point is rounded to `recipe.keep_dtype` in place (the compute dtype stays), so
the model in memory computes exactly what the saved checkpoint will compute after `load`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from . import methods
from .errors import BitsmithError
from .progress import bar as progress_bar
from .nn import QuantConv2d, QuantEmbedding, QuantLinear, _Packed
from .numerics import float_dtype
from .primitives import QWeight, dequantize_weight
from .recipe import Recipe
from .select import select_modules, set_submodule

log = logging.getLogger(__name__)
RECIPE_ATTR = "bitsmith_recipe"      # the recipe a model was quantized with, read by checkpoint.save


def quantize_model(model: nn.Module, recipe: Recipe | str, *, progress: bool = False, **calibration: Any) -> list[dict]:
    """Quantize `model` in place with `recipe` (a Recipe or a preset name); returns a per-layer report."""
    if isinstance(recipe, str):
        recipe = Recipe.preset(recipe)
    if any(isinstance(m, _Packed) for m in model.modules()):
        raise BitsmithError("this model is already quantized by bitsmith; load the original model to quantize again")
    torch.manual_seed(recipe.seed)
    report: list[dict] = []
    if recipe.method in methods.CAST_METHODS:
        keep = methods.CAST_METHODS[recipe.method]
    else:
        method = methods.get(recipe.method)
        if method.NEEDS:
            from .calibrate import quantize_calibrated   # issue 3: sequential calibration engine

            report = quantize_calibrated(model, recipe, progress=progress, **calibration)
        else:
            report = _quantize_data_free(model, recipe, method, progress)
        keep = recipe.keep_dtype
    round_unquantized(model, keep)
    setattr(model, RECIPE_ATTR, recipe)
    return report


def _quantize_data_free(model: nn.Module, recipe: Recipe, method, progress: bool) -> list[dict]:
    chosen = select_modules(model, recipe.targets, recipe.ignore)
    if not chosen:
        raise BitsmithError("the recipe selects no module to quantize; check its targets and ignore patterns")
    bar = progress_bar(chosen, progress, f"{recipe.method} {recipe.scheme.label()}", "layer")
    report = []
    for name, mod in bar:
        t0 = time.perf_counter()
        w = weight_2d(mod)
        qw = method.quantize(w, None, recipe.scheme, name=f"{name}.weight", **recipe.method_args)
        set_submodule(model, name, make_quant_module(mod, qw, recipe.method))
        report.append(layer_report(name, w, qw, recipe.method, time.perf_counter() - t0))
    return report


def weight_2d(mod: nn.Module) -> torch.Tensor:
    """The weight as (N, K): Linear as is, Conv2d flattened per output channel, Embedding (V, D)."""
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1)


def make_quant_module(mod: nn.Module, qw: QWeight, method: str) -> nn.Module:
    if isinstance(mod, nn.Linear):
        return QuantLinear.from_qweight(qw, mod.bias, method)
    if isinstance(mod, nn.Conv2d):
        return QuantConv2d.from_conv(mod, qw, method)
    if isinstance(mod, nn.Embedding):
        return QuantEmbedding.from_embedding(mod, qw, method)
    raise BitsmithError(f"cannot quantize a {type(mod).__name__}")


def layer_report(name: str, w: torch.Tensor, qw: QWeight, method: str, seconds: float, **extra) -> dict:
    w = w.float()
    err = (dequantize_weight(qw) - w).pow(2).sum()
    ref = w.pow(2).sum()
    sqnr = float("inf") if err == 0 else float(10 * torch.log10(ref / err))
    return {"name": name, "method": method, "scheme": qw.scheme.label(), "shape": list(w.shape),
            "weight_rel_err": float((err / ref.clamp(min=1e-30)).sqrt()), "sqnr_db": sqnr,
            "seconds": round(seconds, 4), **extra}


def round_unquantized(model: nn.Module, keep: str | None) -> None:
    """Round every floating tensor that stays in floating point (and every bias) to `keep`, in place."""
    if keep is None:
        return
    dt = float_dtype(keep)
    packed = {id(t) for m in model.modules() if isinstance(m, _Packed) for t in m.buffers(recurse=False)}
    seen = set()
    with torch.no_grad():
        for t in list(model.parameters()) + [b for _, b in _persistent_buffers(model)]:
            if id(t) in packed or id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            t.copy_(t.to(dt).to(t.dtype))


def _persistent_buffers(model: nn.Module):
    for mname, m in model.named_modules():
        for bname, b in m.named_buffers(recurse=False):
            if bname not in m._non_persistent_buffers_set:
                yield f"{mname}.{bname}" if mname else bname, b
