"""Quantized modules holding *packed* codes, scales and zero points as plain buffers, so a model's memory
really shrinks and `state_dict()` is exactly what gets saved.

Each module rebuilds its `QWeight` on demand (`qweight()`) and runs the reference forward: dequantize, then
the float op. Fast kernels (issue 8) plug in behind `forward` without changing the stored format.
Integer zero points are packed at the weight's bit width (as GPTQ's qzeros); fractional ones (HQQ,
imported GGUF Q4_1) are stored as float16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .numerics import float_dtype
from .packing import pack, packed_row_bytes, unpack
from .primitives import QWeight, dequantize_weight, group_size_for
from .recipe import Scheme

ZERO_KINDS = ("none", "packed", "float16")


def zero_kind(qw: QWeight) -> str:
    if qw.zero is None:
        return "none"
    z = qw.zero.float()
    integral = bool(torch.equal(z, torch.round(z))) and float(z.min()) >= 0 and float(z.max()) < (1 << qw.scheme.bits)
    return "packed" if integral else "float16"


class _Packed(nn.Module):
    """Shared storage of one quantized 2-D weight (N, K): packed codes, scales, zeros, act-order perm."""

    def __init__(self, n: int, k: int, scheme: Scheme, method: str, zero: str, has_perm: bool) -> None:
        super().__init__()
        self.n, self.k, self.scheme, self.method, self.zero_kind = n, k, scheme, method, zero
        groups = -(-k // group_size_for(k, scheme.group_size))
        self.register_buffer("qcodes", torch.zeros(n, packed_row_bytes(k, scheme.bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(n, groups, dtype=float_dtype(scheme.scale_dtype)))
        if zero == "packed":
            self.register_buffer("qzero", torch.zeros(n, packed_row_bytes(groups, scheme.bits), dtype=torch.uint8))
        elif zero == "float16":
            self.register_buffer("zero", torch.zeros(n, groups, dtype=torch.float16))
        if has_perm:
            self.register_buffer("perm", torch.arange(k, dtype=torch.int32))

    def _store(self, qw: QWeight) -> None:
        self.qcodes.copy_(pack(qw.codes, self.scheme.bits))
        self.scale.copy_(qw.scale)
        if self.zero_kind == "packed":
            self.qzero.copy_(pack(qw.zero.round().to(torch.uint8), self.scheme.bits))
        elif self.zero_kind == "float16":
            self.zero.copy_(qw.zero)
        if qw.perm is not None:
            self.perm.copy_(qw.perm)

    def qweight(self) -> QWeight:
        groups = self.scale.shape[1]
        zero = None
        if self.zero_kind == "packed":
            zero = unpack(self.qzero, self.scheme.bits, groups).float()
        elif self.zero_kind == "float16":
            zero = self.zero.float()
        perm = getattr(self, "perm", None)
        return QWeight(unpack(self.qcodes, self.scheme.bits, self.k), self.scale, zero, self.scheme, perm)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.qweight(), dtype)

    def quant_info(self) -> dict:
        """What checkpoint.py records for this module so `load` can rebuild it."""
        return {"type": self.kind, "method": self.method, "scheme": _scheme_dict(self.scheme),
                "zero": self.zero_kind, "perm": hasattr(self, "perm"), **self.shape_info()}

    def extra_repr(self) -> str:
        return f"{self.shape_info()}, method={self.method}, scheme={self.scheme.label()}"


def _scheme_dict(s: Scheme) -> dict:
    return {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric, "grid": s.grid,
            "scale_dtype": s.scale_dtype}


class QuantLinear(_Packed):
    kind = "linear"

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, *, bias: bool = False,
                 method: str = "rtn", zero: str = "packed", has_perm: bool = False,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(out_features, in_features, scheme, method, zero, has_perm)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_qweight(cls, qw: QWeight, bias: torch.Tensor | None = None, method: str = "rtn") -> QuantLinear:
        n, k = qw.codes.shape
        m = cls(k, n, qw.scheme, bias=bias is not None, method=method, zero=zero_kind(qw),
                has_perm=qw.perm is not None, bias_dtype=bias.dtype if bias is not None else torch.float32)
        m._store(qw)
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    def shape_info(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


class QuantConv2d(_Packed):
    """Conv2d weight (O, I/groups, kh, kw) quantized as (O, I/groups * kh * kw): groups run along the
    flattened input of each output channel."""

    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], scheme: Scheme, *,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = False, method: str = "rtn",
                 zero: str = "packed", has_perm: bool = False, bias_dtype: torch.dtype = torch.float32) -> None:
        kh, kw = kernel_size
        super().__init__(out_channels, in_channels // groups * kh * kw, scheme, method, zero, has_perm)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=bias_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, qw: QWeight, method: str = "rtn") -> QuantConv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, qw.scheme, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                method=method, zero=zero_kind(qw), has_perm=qw.perm is not None,
                bias_dtype=conv.bias.dtype if conv.bias is not None else torch.float32)
        m._store(qw)
        if conv.bias is not None:
            m.bias.data.copy_(conv.bias.detach())
        return m

    def shape_info(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(_pair(self.stride)),
                "padding": self.padding if isinstance(self.padding, str) else list(_pair(self.padding)),
                "dilation": list(_pair(self.dilation)), "groups": self.groups, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(x.dtype).view(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantEmbedding(_Packed):
    """Embedding table (V, D) quantized per row; a lookup unpacks and dequantizes only the rows it needs."""

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, *, padding_idx=None,
                 method: str = "rtn", zero: str = "packed", has_perm: bool = False,
                 out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(num_embeddings, embedding_dim, scheme, method, zero, has_perm)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = out_dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, qw: QWeight, method: str = "rtn") -> QuantEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, qw.scheme, padding_idx=emb.padding_idx, method=method,
                zero=zero_kind(qw), has_perm=qw.perm is not None, out_dtype=emb.weight.dtype)
        m._store(qw)
        return m

    def shape_info(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        zero = None
        if self.zero_kind == "packed":
            zero = unpack(self.qzero[flat], self.scheme.bits, self.scale.shape[1]).float()
        elif self.zero_kind == "float16":
            zero = self.zero[flat].float()
        rows = QWeight(unpack(self.qcodes[flat], self.scheme.bits, self.k), self.scale[flat], zero, self.scheme,
                       getattr(self, "perm", None))
        return dequantize_weight(rows, self.out_dtype).view(*ids.shape, self.embedding_dim)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


QUANT_MODULES = {"linear": QuantLinear, "conv2d": QuantConv2d, "embedding": QuantEmbedding}


def build_empty(info: dict, dtype: torch.dtype = torch.float32) -> _Packed:
    """An empty module of the recorded kind and shape, ready for `load_state_dict`."""
    scheme = Scheme(**info["scheme"])
    common = {"method": info["method"], "zero": info["zero"], "has_perm": info["perm"]}
    if info["type"] == "linear":
        return QuantLinear(info["in_features"], info["out_features"], scheme, bias=info["bias"],
                           bias_dtype=dtype, **common)
    if info["type"] == "conv2d":
        pad = info["padding"]
        return QuantConv2d(info["in_channels"], info["out_channels"], tuple(info["kernel_size"]), scheme,
                           stride=tuple(info["stride"]), padding=pad if isinstance(pad, str) else tuple(pad),
                           dilation=tuple(info["dilation"]), groups=info["groups"], bias=info["bias"],
                           bias_dtype=dtype, **common)
    if info["type"] == "embedding":
        return QuantEmbedding(info["num_embeddings"], info["embedding_dim"], scheme,
                              padding_idx=info["padding_idx"], out_dtype=dtype, **common)
    raise ValueError(f"unknown quantized module type {info['type']!r}")
