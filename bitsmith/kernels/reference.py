"""The oracle every fast kernel is tested against: plain torch, no tricks, easy to read.

Weight-only (W4A16 / W8A16): dequantize the QWeight to float, then one matmul. W8A8: per-token absmax int8
activations times per-channel int8 weights, summed exactly in float64 (int8 products of K <= 2^37 terms
are exact there), then scaled. FP8: the same with e4m3 codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives import QWeight, dequantize_weight

FP8_E4M3_MAX = 448.0


def weight_only_linear(x: torch.Tensor, qw: QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W the dequantized QWeight, computed in float32 and returned in x's dtype."""
    w = dequantize_weight(qw, torch.float32)                                    # (N, K)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def _row_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """absmax * fp32(1 / qmax), spelled out: `t / scalar` is an exact division on the CPU but torch's CUDA
    kernel multiplies by the rounded reciprocal, 1 ulp off in about half the rows, so the oracle would
    depend on its device (the kernels compute this same product)."""
    return x.abs().amax(-1, keepdim=True).clamp(min=1e-12) * torch.tensor(1.0 / qmax, dtype=torch.float32)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric int8: (M, K) float -> codes (M, K) int8, scales (M, 1) float32."""
    x = x.float()
    s = _row_scale(x, 127.0)
    return torch.clamp(torch.round(x / s), -127, 127).to(torch.int8), s


def w8a8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic per-token int8 activations x per-channel int8 weights. x (..., K), w8 (N, K) int8,
    w_scale (N,). Returns x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, sx = quantize_rows_int8(x2)
    acc = (xq.double() @ w8.double().t()).float()                              # exact int32-range sums
    y = acc * sx * w_scale.float().view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], w8.shape[0])


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax e4m3: (M, K) -> codes (M, K) float8_e4m3fn, scales (M, 1) float32."""
    x = x.float()
    s = _row_scale(x, FP8_E4M3_MAX)
    return (x / s).to(torch.float8_e4m3fn), s


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic per-token e4m3 activations x per-channel e4m3 weights (N, K), w_scale (N,)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, sx = quantize_rows_fp8(x2)
    y = (xq.float() * sx) @ (w8.float() * w_scale.float().view(-1, 1)).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], w8.shape[0])
