"""Activation-quantized modules (W8A8): int8 per-channel weights and int8 activations, multiplied as integers.

Activations are symmetric int8 codes q = clamp(round(x / s), -127, 127) with either one frozen scale per
tensor from calibration (static: `act_scale` > 0, chosen by an observer, see observers.py) or one scale per
token computed at run time (dynamic: `act_scale` = 0, s = max|x_t| / 127). The product q W8^T is an exact
int32 sum, then y = sum * s_x * s_w + b. On the CPU the sums come from fbgemm (kernels/cpu_w8a8.py); the
reference is nn.int8_matmul_reference; both are exact, so they agree bit for bit before the float epilogue.
Conv2d unfolds its input into patches (rows of the flattened weight) and takes the same path.
`W8A8ScaledLinear` adds SmoothQuant's per-channel division at run time, for inputs that no preceding op can
absorb it into (BERT's q/k/v and FFN read a LayerNorm output that also feeds the residual): the codes describe
W diag(s), `input_scale` = 1/s, and the codes are round(x * (input_scale / s_x)), one multiply per element as
in the plain path, so the product stays one int8 GEMM with one per-tensor activation scale.
`FP8ActLinear` simulates e4m3 activations (quantize-dequantize; no CPU FP8 GEMM exists) on int8 weights.
The weights sit in `_Packed`'s storage (8-bit symmetric codes q + 128), so checkpoints, `inspect` and the
exporters read them like any other QuantLinear; the activation scale is a transform buffer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import kernels
from .errors import BitsmithError
from .kernels import cpu_w8a8
from .nn import QuantConv2d, QuantLinear, int8_matmul_reference
from .numerics import FP8_MAX
from .packing import unpack
from .primitives import dequantize_weight

QMAX = 127


# ---- pure activation math --------------------------------------------------------------------------------
def quantize_act(x2: torch.Tensor, act_scale: torch.Tensor, input_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> integer codes in [-127, 127] as float (M, K), and the scale: () static or (M, 1) dynamic.
    `input_scale` (K,) multiplies x first (run-time smoothing); statically it joins the one multiply by 1/s."""
    x2 = x2.float()
    if float(act_scale.reshape(-1)[0]) > 0:
        s = act_scale.reshape(()).float()
        y = x2 / s if input_scale is None else x2 * (input_scale.float() / s)
        return torch.clamp(torch.round(y), -QMAX, QMAX), s
    if input_scale is not None:
        x2 = x2 * input_scale.float()
    s = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12) / QMAX                     # (M, 1) per token
    return torch.clamp(torch.round(x2 / s), -QMAX, QMAX), s


def fake_quantize_fp8(x: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 under a static per-tensor scale (> 0) or per-token absmax / 448 (0)."""
    fmax = FP8_MAX["fp8_e4m3"]
    if float(act_scale.reshape(-1)[0]) > 0:
        s = act_scale.reshape(()).float()
    else:
        s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / fmax
    y = (x.float() / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn).float() * s
    return y.to(x.dtype)


def _int8_weight(mod) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) signed int8 weight values (codes - 2^(b-1)) and (N,) float32 scales of a symmetric per-channel
    module of 2..8 bits (W4A8 uses the same integer product with |w| <= 7)."""
    if mod.scheme.bits == 8:
        w8 = (mod.qcodes ^ 128).view(torch.int8)
    else:
        w8 = (unpack(mod.qcodes, mod.scheme.bits, mod.k).to(torch.int16) - (1 << (mod.scheme.bits - 1))).to(torch.int8)
    return w8, mod.scales().float().view(-1)


def _check_scheme(scheme, what: str) -> None:
    if scheme.bits < 2 or not scheme.symmetric or scheme.grid != "int" or scheme.group_size is not None:
        raise BitsmithError(f"{what} needs symmetric per-channel int weights of 2..8 bits, got {scheme.label()}")


def use_kernel(x: torch.Tensor) -> bool:
    """The fbgemm path runs on CPU inputs without autograd unless BITSMITH_KERNELS=reference."""
    return (x.device.type == "cpu" and kernels.policy() != "reference" and cpu_w8a8.missing() is None
            and not (torch.is_grad_enabled() and x.requires_grad))


def int8_rows(mod, q: torch.Tensor, kernel: bool) -> torch.Tensor:
    """q (M, K) integer codes (float) -> (M, N) float32 = (q W8^T) * s_w, exact sums either way."""
    if kernel:
        return cpu_w8a8.matmul_scaled(q.contiguous(), _pack(mod))
    w8, sw = _int8_weight(mod)
    return int8_matmul_reference(q.to(torch.int8), w8.t()).float() * sw


def _pack(mod) -> cpu_w8a8.Pack:
    """The module's fbgemm weight, built on first use and rebuilt when its codes or scales change."""
    key = (mod.qcodes.data_ptr(), mod.qcodes._version, mod.scale.data_ptr(), mod.scale._version)
    hit = mod.__dict__.get("_w8a8_pack")
    if hit is None or hit[0] != key:
        hit = (key, cpu_w8a8.pack(*_int8_weight(mod)))
        mod.__dict__["_w8a8_pack"] = hit
    return hit[1]


def w8a8_rows(mod, x2: torch.Tensor) -> torch.Tensor:
    """(M, K) float -> (M, N) float32 without bias: quantize activations, integer product, rescale."""
    q, s = quantize_act(x2, mod.act_scale, getattr(mod, "input_scale", None))
    return int8_rows(mod, q, use_kernel(x2)) * s


# ---- modules ---------------------------------------------------------------------------------------------
class W8A8Linear(QuantLinear):
    """int8 per-channel weights x int8 activations (static per-tensor or dynamic per-token scale)."""

    kind = "linear_w8a8"
    TRANSFORMS = ("act_scale",)

    def __init__(self, in_features: int, out_features: int, scheme, **kw) -> None:
        _check_scheme(scheme, "W8A8Linear")
        super().__init__(in_features, out_features, scheme, **kw)

    @property
    def dynamic(self) -> bool:
        return not float(self.act_scale.reshape(-1)[0]) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = w8a8_rows(self, x.reshape(-1, self.k))                                   # (M, N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.dynamic else f"static {float(self.act_scale.reshape(-1)[0]):.4g}"
        return f"{super().extra_repr()}, act=int8 {act}"


class W8A8ScaledLinear(W8A8Linear):
    """W8A8 with a run-time per-input-channel scale (SmoothQuant without a fold target): the codes describe
    W diag(s) and `input_scale` = 1/s, so y = Q(x / s) Q(W diag(s))^T approximates x W^T."""

    kind = "linear_w8a8_scaled"
    TRANSFORMS = ("act_scale", "input_scale")


class W8A8Conv2d(QuantConv2d):
    """Conv2d with int8 weights and int8 activations: patches (B * L, C * kh * kw) through W8A8's product."""

    kind = "conv2d_w8a8"
    TRANSFORMS = ("act_scale",)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, scheme, **kw) -> None:
        _check_scheme(scheme, "W8A8Conv2d")
        if kw.get("groups", 1) != 1 or isinstance(kw.get("padding", 0), str):
            raise BitsmithError("W8A8Conv2d supports groups=1 and numeric padding only")
        super().__init__(in_channels, out_channels, kernel_size, scheme, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        x4 = x if batched else x.unsqueeze(0)
        b, _, h, w = x4.shape
        cols = F.unfold(x4, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])                      # (B * L, C * kh * kw)
        y = w8a8_rows(self, rows)                                                    # (B * L, O)
        if self.bias is not None:
            y = y + self.bias.float()
        ho, wo = _out_hw(h, w, self)
        y = y.view(b, ho * wo, self.out_channels).transpose(1, 2).reshape(b, self.out_channels, ho, wo)
        y = y.to(x.dtype)
        return y if batched else y.squeeze(0)


class FP8ActLinear(QuantLinear):
    """Simulated FP8 e4m3 activations (static or per-token scale) on int8 per-channel weights."""

    kind = "linear_a_fp8"
    TRANSFORMS = ("fp8_act_scale",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_weight(dataclasses.replace(self.qweight(), transform=None), x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(fake_quantize_fp8(x, self.fp8_act_scale), w, bias)


def _out_hw(h: int, w: int, m) -> tuple[int, int]:
    (ph, pw), (dh, dw), (sh, sw) = _pair(m.padding), _pair(m.dilation), _pair(m.stride)
    kh, kw = m.kernel_size
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


ACT_LINEAR_CLASSES = (W8A8Linear, W8A8ScaledLinear, FP8ActLinear)
ACT_CONV_CLASSES = (W8A8Conv2d,)
