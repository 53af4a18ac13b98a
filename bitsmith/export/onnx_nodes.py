"""The quantized nodes of bitsmith's ONNX export: ONNX Runtime's com.microsoft MatMulNBits layout (pure
functions, bit-exact from a QWeight) and the QDQ (static W8A8) parameters, plus the stand-in modules that
emit these nodes during torch.onnx export (`torch.onnx.ops.symbolic`) and compute the same numbers in torch
otherwise. onnx.py swaps them in and exports the graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitsmithError
from ..nn import QuantConv2d, QuantLinear, _Packed
from ..nn_act import QMAX
from ..numerics import IntGrid
from ..packing import pack
from ..primitives import QWeight, choose_qparams, dequantize, quantize, symmetric_zero

DEFAULT_OPSET = 18            # QuantizeLinear/DequantizeLinear with per-axis scales; ONNX Runtime >= 1.14
NBITS = (2, 4, 8)             # the widths ONNX Runtime's MatMulNBits kernels take
MAX_BLOCK = 128


# ---- MatMulNBits layout (pure functions) --------------------------------------------------------------
def block_size_for(k: int, g: int) -> int:
    """A MatMulNBits block size (a power of two >= 16) that divides the group size g, so each block lies in
    one group and takes its scale; per-channel (g >= k): any block does, 128 or the smallest >= k."""
    if g >= k:
        return min(MAX_BLOCK, max(16, 1 << (k - 1).bit_length()))
    b = g & -g                                   # the largest power of two dividing g
    if b < 16:
        raise BitsmithError(f"group size {g} has no power-of-two factor >= 16, which MatMulNBits blocks need; "
                            "quantize with --group-size 16, 32, 64, 128 (or a multiple of 16)")
    return min(b, MAX_BLOCK)


def matmulnbits_tensors(qw: QWeight) -> dict[str, Any]:
    """QWeight (int grid) -> MatMulNBits inputs and attributes, codes bit-exact:
    B (N, blocks, block*bits/8) uint8, scales (N * blocks) float32, zero_points packed uint8
    (N * ceil(blocks*bits/8)) for integral zeros, float32 (N * blocks) for fractional ones (HQQ), absent
    when symmetric (the operator's default zero 2^(bits-1) is bitsmith's symmetric zero)."""
    s = qw.scheme
    if s.grid != "int" or s.bits not in NBITS:
        raise BitsmithError(f"MatMulNBits takes {', '.join(map(str, NBITS))}-bit integer weights, got {s.label()}; "
                            "re-quantize with --bits 4 or 8 (or use --format gguf)")
    n, k = qw.codes.shape
    g = min(qw.group_size, k)
    b = block_size_for(k, g)
    blocks = -(-k // b)
    group_of_block = (torch.arange(blocks) * b) // g                        # (blocks,)
    codes = F.pad(qw.codes, (0, blocks * b - k))                            # (N, blocks*b), padding never read
    out: dict[str, Any] = {
        "B": pack(codes, s.bits).view(n, blocks, b * s.bits // 8),
        "scales": qw.scale.float()[:, group_of_block].reshape(-1),
        "attrs": {"K": k, "N": n, "bits": s.bits, "block_size": b},
    }
    if qw.zero is not None:
        z = qw.zero.float()[:, group_of_block]                              # (N, blocks)
        integral = bool(torch.equal(z, z.round())) and float(z.min()) >= 0 and float(z.max()) < (1 << s.bits)
        out["zero_points"] = pack(z.to(torch.uint8), s.bits).reshape(-1) if integral else z.reshape(-1)
    return out


def dequantize_matmulnbits(t: dict[str, Any]) -> torch.Tensor:
    """The operator's own definition, (q - zero) * scale per block, from the exported tensors: (N, K). The
    independent check that the layout above means what bitsmith's codes mean."""
    a = t["attrs"]
    n, k, bits, b = a["N"], a["K"], a["bits"], a["block_size"]
    blocks = t["B"].shape[1]
    mask = (1 << bits) - 1
    stream = t["B"].reshape(n, -1).to(torch.int32)                          # (N, bytes)
    per = 8 // bits
    q = torch.stack([(stream >> (i * bits)) & mask for i in range(per)], -1).reshape(n, -1)[:, : blocks * b]
    if "zero_points" not in t:
        zero = torch.full((n, blocks), float(1 << (bits - 1)))
    elif t["zero_points"].dtype == torch.uint8:
        zs = t["zero_points"].view(n, -1).to(torch.int32)
        zero = torch.stack([(zs >> (i * bits)) & mask for i in range(per)], -1).reshape(n, -1)[:, :blocks].float()
    else:
        zero = t["zero_points"].view(n, blocks)
    scale = t["scales"].view(n, blocks)
    w = (q.view(n, blocks, b).float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.view(n, -1)[:, :k]


class MatMulNBitsLinear(nn.Module):
    """Stands in for a quantized linear during export: emits com.microsoft MatMulNBits (plus a Mul for
    AWQ's input scale, a Gather for GPTQ's act-order permutation, an Add for the bias); in torch it
    computes the same product from the same tensors."""

    def __init__(self, mod: QuantLinear) -> None:
        super().__init__()
        qw = mod.qweight()
        t = matmulnbits_tensors(qw)
        self.attrs, self.n = t["attrs"], qw.codes.shape[0]
        self.register_buffer("B", t["B"])
        self.register_buffer("scales", t["scales"])
        self.register_buffer("zero_points", t.get("zero_points"))
        self.register_buffer("perm", None if qw.perm is None else qw.perm.long())
        # AWQ's InputScaledLinear and W8A8's run-time smoothing (W8A8ScaledLinear) both keep 1/s here
        scaled = "input_scale" in (mod.transform_spec or {})
        self.register_buffer("input_scale", mod.input_scale.float() if scaled else None)
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().float(), requires_grad=False)
        self._weight = dequantize_matmulnbits(t)                            # (N, K) eager reference only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if torch.onnx.is_in_onnx_export():
            inputs = [x, self.B, self.scales] + ([self.zero_points] if self.zero_points is not None else [])
            y = torch.onnx.ops.symbolic("com.microsoft::MatMulNBits", inputs, dict(self.attrs), dtype=x.dtype,
                                        shape=(*x.shape[:-1], self.n), version=1)
        else:
            w = self._weight if self.perm is None else self._weight[:, self.perm]
            y = F.linear(x, w.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ---- QDQ (static W8A8) --------------------------------------------------------------------------------
def activation_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 asymmetric per-tensor (scale float32, zero uint8) covering [lo, hi] (extended to include 0)."""
    scale, zero = choose_qparams(lo.reshape(()), hi.reshape(()), IntGrid(8), symmetric=False)
    return scale.float(), zero.to(torch.uint8)


def qdq_weight(qw: QWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale (N,), zero (N,)) for DequantizeLinear along axis 0, bit-exact: asymmetric codes stay
    uint8 with their zero points; symmetric ones become int8 (code - 128) with zero 0, the signed form
    ONNX Runtime's integer kernels prefer for weights."""
    s = qw.scheme
    transform = dict(qw.transform or {})
    if "act_scale" in transform:       # the scales are the input's; W8A8's run-time smoothing becomes a Mul
        transform = {k: v for k, v in transform.items() if k not in ("act_scale", "input_scale")}
    if s.grid != "int" or s.bits != 8 or qw.scale.shape[1] != 1 or qw.perm is not None or transform:
        raise BitsmithError(f"QDQ export takes plain 8-bit per-channel integer weights (--bits 8 --group-size -1, "
                            f"method rtn/gptq without act-order), got {s.label()}")
    scale = qw.scale.float().reshape(-1)
    if qw.zero is None:
        codes = (qw.codes.to(torch.int16) - int(symmetric_zero(s))).to(torch.int8)
        return codes, scale, torch.zeros_like(scale, dtype=torch.int8)
    z = qw.zero.float().reshape(-1)
    if not bool(torch.equal(z, z.round())):
        raise BitsmithError("QDQ export needs integer zero points (DequantizeLinear's are uint8); got fractional "
                            "ones (HQQ); use method rtn or gptq")
    return qw.codes.clone(), scale, z.to(torch.uint8)


def _qdq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, floor: torch.Tensor | None = None) -> torch.Tensor:
    """[Max(x, floor)] then QuantizeLinear then DequantizeLinear (per-tensor; uint8 or int8 after the zero
    point's dtype): the nodes in the graph, the same math (round half to even, saturate) in torch."""
    if torch.onnx.is_in_onnx_export():
        if floor is not None:
            x = torch.onnx.ops.symbolic("::Max", (x, floor), dtype=x.dtype, shape=x.shape, version=DEFAULT_OPSET)
        q = torch.onnx.ops.symbolic("::QuantizeLinear", (x, scale, zero), dtype=zero.dtype, shape=x.shape,
                                    version=DEFAULT_OPSET)
        return torch.onnx.ops.symbolic("::DequantizeLinear", (q, scale, zero), dtype=x.dtype, shape=x.shape,
                                       version=DEFAULT_OPSET)
    if floor is not None:
        x = torch.maximum(x, floor.to(x.dtype))
    z = zero.float()
    grid = IntGrid(8, signed=zero.dtype == torch.int8)
    return dequantize(quantize(x, scale, z, grid), scale, z).to(x.dtype)


def static_act_qparams(mod: _Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """bitsmith's own static activation scale of a W8A8 module (issue 7: symmetric int8, zero 0) as
    QuantizeLinear parameters (scale, zero, floor); None for a weight-only module (its range comes from a
    min-max pass)."""
    spec = mod.transform_spec or {}
    if "fp8_act_scale" in spec:
        raise BitsmithError(f"{type(mod).__name__}: FP8 activations have no int8 QDQ form; export weight-only")
    if "act_scale" not in spec:
        return None
    s = mod.act_scale.reshape(-1)[0].float()
    if not float(s) > 0:
        raise BitsmithError("dynamic per-token activation scales have no static QDQ form; quantize with static "
                            "activation scales (calibrated w8a8) or export weight-only (--option mode=matmulnbits)")
    # bitsmith's codes are clamp(round(x / s), -127, 127), QuantizeLinear saturates to [-128, 127]: inputs below
    # the calibrated range (MiniLM's first block: 0.2% of its QKV input on held-out text) would become -128, a
    # code bitsmith never produces. Max(x, -127 s) before QuantizeLinear gives exactly bitsmith's codes.
    return s.reshape(()), torch.zeros((), dtype=torch.int8), (-QMAX * s).reshape(())


class QDQModule(nn.Module):
    """Stands in for an 8-bit QuantLinear / QuantConv2d during export: static input Q/DQ, weight
    DequantizeLinear(codes, per-channel scale and zero, axis 0), then the float MatMul / Conv."""

    def __init__(self, mod: _Packed, act_scale: torch.Tensor, act_zero: torch.Tensor,
                 act_floor: torch.Tensor | None = None) -> None:
        super().__init__()
        codes, scale, zero = qdq_weight(mod.qweight())
        self.conv = isinstance(mod, QuantConv2d)
        if self.conv:
            codes = codes.view(mod.out_channels, mod.in_channels // mod.groups, *mod.kernel_size)
            self.conv_args = (mod.stride, mod.padding, mod.dilation, mod.groups)
        self.register_buffer("codes", codes)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", zero)
        self.register_buffer("x_scale", act_scale)
        self.register_buffer("x_zero", act_zero)
        self.register_buffer("x_floor", act_floor)
        # W8A8 with run-time SmoothQuant (nn_act.W8A8ScaledLinear): a Mul by 1/s before QuantizeLinear
        spec = mod.transform_spec or {}
        smooth = "input_scale" in spec and "act_scale" in spec
        self.register_buffer("input_scale", mod.input_scale.float() if smooth else None)
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().float(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return torch.onnx.ops.symbolic("::DequantizeLinear", (self.codes, self.w_scale, self.w_zero), {"axis": 0},
                                           dtype=torch.float32, shape=self.codes.shape, version=DEFAULT_OPSET)
        view = [-1] + [1] * (self.codes.dim() - 1)
        return (self.codes.float() - self.w_zero.float().view(view)) * self.w_scale.view(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        x = _qdq(x, self.x_scale, self.x_zero, self.x_floor)
        if self.conv:
            return F.conv2d(x, self.weight(), self.bias, *self.conv_args)
        return F.linear(x, self.weight(), self.bias)
