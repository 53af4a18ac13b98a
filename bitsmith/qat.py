"""Quantization-aware training: `prepare_qat(model, recipe)` -> train with any loop -> `convert(model)`.

prepare_qat swaps each selected Linear / Conv2d for a fake-quant twin that keeps the float weight trainable
and rounds it on every forward to the recipe's grid (symmetric, one scale per output channel), and rounds
its input to int8 (per-tensor symmetric) unless `act_bits=None`; `per_tensor=True` gives each weight one
scale instead of one per output channel (converted as equal per-channel scales). Rounding passes gradients straight through
(STE, Bengio et al. 2013; values outside the clamp get none). Scales are either recomputed from the data
(weights: max|w| / qmax each step; activations: a moving average of the batch max |x|, frozen in eval
mode) or, with `lsq=True`, learned (LSQ, Esser et al. 2020: the gradient reaches the step size, scaled
by 1 / sqrt(numel * qmax)). `convert` rounds the weights once more with the final scales and builds the
same modules PTQ builds (nn_act.W8A8Linear / W8A8Conv2d with activations, QuantLinear / QuantConv2d
without), so save, load and export treat a QAT model exactly like a post-training one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .apply import RECIPE_ATTR, make_quant_module, weight_2d
from .errors import BitsmithError
from .numerics import float_dtype
from .primitives import QWeight
from .recipe import Recipe, Scheme
from .select import select_modules, set_submodule


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """s forward, gradient times g backward (LSQ's step-size gradient scale)."""
    return (s - s * g).detach() + s * g


def fake_quant(x: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric fake quantization clamp(round(x / s), -qmax, qmax) * s with STE rounding."""
    return torch.clamp(round_ste(x / s), -qmax, qmax) * s


class _FakeQuant(nn.Module):
    """Shared state of a fake-quant layer: weight bits / scale, activation scale (EMA or learned)."""

    def _setup(self, scheme: Scheme, act_bits: int | None, lsq: bool, momentum: float,
               per_tensor: bool = False) -> None:
        self.scheme, self.act_bits, self.lsq, self.momentum = scheme, act_bits, lsq, momentum
        self.per_tensor = per_tensor
        self.wq = (1 << (scheme.bits - 1)) - 1
        w = self.weight.detach().reshape(self.weight.shape[0], -1)
        init = (self._absmax(w) / self.wq).clamp(min=1e-8)                        # (N,) or (1,)
        self.w_scale = nn.Parameter(init) if lsq else None
        self.aq = None if act_bits is None else (1 << (act_bits - 1)) - 1
        if lsq and act_bits is not None:
            self.a_scale = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("a_scale", torch.zeros(()))                       # 0 = not yet observed

    def _absmax(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().amax().reshape(1) if self.per_tensor else w.abs().amax(1)

    def weight_scale(self) -> torch.Tensor:
        """(N,) step sizes, one per output channel (equal ones under `per_tensor`)."""
        w = self.weight.reshape(self.weight.shape[0], -1)
        if self.lsq:
            s = grad_scale(self.w_scale.abs().clamp(min=1e-8), 1.0 / math.sqrt(w.numel() * self.wq))
        else:
            s = (self._absmax(w.detach()) / self.wq).clamp(min=1e-8)
        return s.expand(w.shape[0])

    def fq_weight(self) -> torch.Tensor:
        s = self.weight_scale().view(-1, *([1] * (self.weight.dim() - 1)))
        return fake_quant(self.weight, s, self.wq)

    def fq_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is None:
            return x
        if float(self.a_scale.detach()) == 0.0:                                    # first batch initializes
            with torch.no_grad():
                self.a_scale.copy_((x.detach().abs().max() / self.aq).clamp(min=1e-8))
        if self.lsq:
            s = grad_scale(self.a_scale.abs().clamp(min=1e-8), 1.0 / math.sqrt(x[0].numel() * self.aq))
        else:
            if self.training:
                with torch.no_grad():
                    now = (x.detach().abs().max() / self.aq).clamp(min=1e-8)
                    self.a_scale.mul_(1 - self.momentum).add_(now, alpha=self.momentum)
            s = self.a_scale
        return fake_quant(x, s, self.aq)

    def act_scale(self) -> float | None:
        return None if self.aq is None else float(self.a_scale.detach().abs())


class QATLinear(nn.Linear, _FakeQuant):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fq_input(x), self.fq_weight(), self.bias)


class QATConv2d(nn.Conv2d, _FakeQuant):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.fq_input(x), self.fq_weight(), self.bias)


def _twin(mod: nn.Module) -> nn.Module:
    if type(mod) is nn.Linear:
        new = QATLinear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    elif type(mod) is nn.Conv2d:
        if mod.groups != 1 or isinstance(mod.padding, str):
            raise BitsmithError("QAT supports Conv2d with groups=1 and numeric padding")
        new = QATConv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                        dilation=mod.dilation, bias=mod.bias is not None)
    else:
        raise BitsmithError(f"QAT cannot fake-quantize a {type(mod).__name__}")
    new.to(mod.weight.device, mod.weight.dtype)
    new.weight.data.copy_(mod.weight.data)
    if mod.bias is not None:
        new.bias.data.copy_(mod.bias.data)
    return new


def prepare_qat(model: nn.Module, recipe: Recipe | str, *, act_bits: int | None = 8, lsq: bool = False,
                momentum: float = 0.1, per_tensor: bool = False) -> nn.Module:
    """Swap the recipe's Linear / Conv2d targets for fake-quant twins, in place; returns the model.
    Weights: `recipe.scheme.bits`, symmetric per output channel (or per tensor); inputs: `act_bits` per
    tensor (None: off)."""
    if isinstance(recipe, str):
        recipe = Recipe.preset(recipe)
    s = recipe.scheme
    if s.grid != "int" or s.bits < 2:
        raise BitsmithError(f"QAT rounds to symmetric integer grids of 2..8 bits, got {s.label()}")
    scheme = Scheme(bits=s.bits, group_size=None, symmetric=True, grid="int", scale_dtype=s.scale_dtype)
    chosen = [(n, m) for n, m in select_modules(model, recipe.targets, recipe.ignore)
              if type(m) in (nn.Linear, nn.Conv2d)]
    if not chosen:
        raise BitsmithError("the recipe selects no Linear or Conv2d to train with fake quantization")
    for name, mod in chosen:
        twin = _twin(mod)
        twin._setup(scheme, act_bits, lsq, momentum, per_tensor)
        set_submodule(model, name, twin)
    args = {"act_bits": act_bits, "lsq": lsq, "per_tensor": per_tensor}
    setattr(model, RECIPE_ATTR, Recipe(method="qat", scheme=scheme, targets=recipe.targets, ignore=recipe.ignore,
                                       method_args=args, keep_dtype=None))
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every fake-quant layer by the packed module PTQ would build, in place; returns the model."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _FakeQuant)]
    if not found:
        raise BitsmithError("the model has no QAT layers; call prepare_qat(model, recipe) and train first")
    for name, m in found:
        with torch.no_grad():
            s = m.weight_scale().detach().float()
            s = s.to(float_dtype(m.scheme.scale_dtype)).float()                     # the scale as stored
            w = weight_2d(m).float()
            codes = torch.clamp(torch.round(w / s.view(-1, 1)), -m.wq, m.wq) + (1 << (m.scheme.bits - 1))
            a = m.act_scale()
            transform = None if a is None else {"act_scale": torch.tensor([a], dtype=torch.float32)}
            qw = QWeight(codes.to(torch.uint8), s.view(-1, 1).to(float_dtype(m.scheme.scale_dtype)), None,
                         m.scheme, transform=transform)
            plain = _plain(m)
        set_submodule(model, name, make_quant_module(plain, qw, "qat").to(m.weight.device))
    return model


def _plain(m: nn.Module) -> nn.Module:
    """A float module of the same shape (make_quant_module reads its geometry and bias)."""
    if isinstance(m, QATConv2d):
        p = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, bias=m.bias is not None)
    else:
        p = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    p.weight.data.copy_(m.weight.data)
    if m.bias is not None:
        p.bias.data.copy_(m.bias.data)
    return p
