"""Quantized modules holding *packed* codes, scales and zero points as plain buffers, so a model's memory
really shrinks and `state_dict()` is exactly what gets saved.

Each module rebuilds its `QWeight` on demand (`qweight()`) and runs the reference forward: dequantize, then
the float op. Fast kernels (issue 8) plug in behind `forward` without changing the stored format.
Integer zero points are packed at the weight's bit width (as GPTQ's qzeros); fractional ones (HQQ) are
stored as float16, or as float32 where float16 would change them (GGUF Q4_1 / K-quant imports: zero = min /
scale must give the file's min back exactly).

`QWeight.transform` tensors are stored as buffers of the same name, exactly as given. Two kinds exist:
storage of the scales themselves (NF4 double quantization: `scale_codes`/`scale_absmax`/`scale_offset`
replace the float `scale` buffer), and run-time transforms, which a module class must apply in its forward
(its TRANSFORMS): `Int8MixedLinear` (LLM.int8(), `outlier_threshold`; `Int8ZeroPointLinear` adds the
`act_zero_point` marker), `HadamardLinear` (incoherence, `had_in`/`had_out`) and `InputScaledLinear` (AWQ,
`input_scale`). `QuantLinear.from_qweight` picks the
class that applies exactly the transforms a QWeight carries, and refuses one it cannot apply rather than
computing something else.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import BitsmithError
from .numerics import IntGrid, dtype_name, float_dtype
from .packing import pack, packed_row_bytes, unpack
from .primitives import (QWeight, choose_qparams, double_dequantize, dequantize_weight, group_size_for,
                         quantize, random_hadamard, unpack_signs)
from .recipe import Scheme

ZERO_KINDS = ("none", "packed", "float16", "float32")
FLOAT_ZEROS = ("float16", "float32")     # fractional zeros; float32 only where float16 would change them
SCALE_TRANSFORMS = ("scale_codes", "scale_absmax", "scale_offset")   # double-quantized scales (NF4 + DQ)


def zero_kind(qw: QWeight) -> str:
    if qw.zero is None:
        return "none"
    z = qw.zero.float()
    integral = (bool(torch.equal(z, torch.round(z))) and float(z.min()) >= 0
                and float(z.max()) < (1 << qw.scheme.bits))
    if integral:
        return "packed"
    # GGUF Q4_1/K-quant imports: zero = min / scale must stay float32 to give the file's min back exactly
    return "float16" if torch.equal(z, z.to(torch.float16).float()) else "float32"


def transform_spec(qw: QWeight) -> dict[str, dict]:
    """{name: {"shape", "dtype"}} of a QWeight's transform tensors: what a module must store for it."""
    return {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
            for name, t in (qw.transform or {}).items()}


def runtime_transforms(spec: dict) -> set[str]:
    """The transform names a module's forward must apply (all but the scale storage)."""
    return set(spec) - set(SCALE_TRANSFORMS)


class _Packed(nn.Module):
    """Shared storage of one quantized 2-D weight (N, K): packed codes, scales, zeros, act-order perm, and
    the QWeight's transform tensors (see the module docstring)."""

    TRANSFORMS: tuple[str, ...] = ()      # run-time transforms this class applies in forward
    BEFORE_KERNEL: tuple[str, ...] = ()   # of those, the ones forward applies to x before any kernel runs

    def __init__(self, n: int, k: int, scheme: Scheme, method: str, zero: str, has_perm: bool,
                 transform: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.n, self.k, self.scheme, self.method, self.zero_kind = n, k, scheme, method, zero
        self.transform_spec = dict(transform or {})
        unknown = runtime_transforms(self.transform_spec) - set(self.TRANSFORMS)
        if unknown:
            raise BitsmithError(f"{type(self).__name__} cannot apply the transform(s) "
                                f"{', '.join(sorted(unknown))} at run time (method {method})")
        groups = -(-k // group_size_for(k, scheme.group_size))
        self.n_groups = groups            # scale groups per row (not QuantConv2d's conv groups)
        self.register_buffer("qcodes", torch.zeros(n, packed_row_bytes(k, scheme.bits), dtype=torch.uint8))
        if "scale_codes" not in self.transform_spec:
            self.register_buffer("scale", torch.ones(n, groups, dtype=float_dtype(scheme.scale_dtype)))
        if zero == "packed":
            qzero = torch.zeros(n, packed_row_bytes(groups, scheme.bits), dtype=torch.uint8)
            self.register_buffer("qzero", qzero)
        elif zero in FLOAT_ZEROS:
            self.register_buffer("zero", torch.zeros(n, groups, dtype=float_dtype(zero)))
        if has_perm:
            self.register_buffer("perm", torch.arange(k, dtype=torch.int32))
        for name, spec in self.transform_spec.items():
            if hasattr(self, name):
                raise BitsmithError(f"transform name {name!r} clashes with an attribute of "
                                    f"{type(self).__name__}")
            self.register_buffer(name, torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"])))

    def _store(self, qw: QWeight) -> None:
        self.qcodes.copy_(pack(qw.codes, self.scheme.bits))
        if "scale_codes" not in self.transform_spec:
            self.scale.copy_(qw.scale)
        for name in self.transform_spec:
            getattr(self, name).copy_(qw.transform[name])
        if self.zero_kind == "packed":
            self.qzero.copy_(pack(qw.zero.round().to(torch.uint8), self.scheme.bits))
        elif self.zero_kind in FLOAT_ZEROS:
            self.zero.copy_(qw.zero)
        if qw.perm is not None:
            self.perm.copy_(qw.perm)

    def scales(self) -> torch.Tensor:
        """(N, G) scales: the stored buffer, or rebuilt from their 8-bit double quantization."""
        if "scale_codes" in self.transform_spec:
            return double_dequantize(self.scale_codes, self.scale_absmax, self.scale_offset)
        return self.scale

    def transforms(self) -> dict[str, torch.Tensor] | None:
        return {name: getattr(self, name) for name in self.transform_spec} or None

    def qweight(self) -> QWeight:
        groups = self.n_groups
        zero = None
        if self.zero_kind == "packed":
            zero = unpack(self.qzero, self.scheme.bits, groups).float()
        elif self.zero_kind in FLOAT_ZEROS:
            zero = self.zero.float()
        perm = getattr(self, "perm", None)
        return QWeight(unpack(self.qcodes, self.scheme.bits, self.k), self.scales(), zero, self.scheme, perm,
                       self.transforms())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.qweight(), dtype)

    def quant_info(self) -> dict:
        """What checkpoint.py records for this module so `load` can rebuild it."""
        info = {"type": self.kind, "method": self.method, "scheme": _scheme_dict(self.scheme),
                "zero": self.zero_kind, "perm": hasattr(self, "perm"), **self.shape_info()}
        if self.transform_spec:
            info["transform"] = self.transform_spec
        return info

    def extra_repr(self) -> str:
        return f"{self.shape_info()}, method={self.method}, scheme={self.scheme.label()}"


def _scheme_dict(s: Scheme) -> dict:
    return {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric, "grid": s.grid,
            "scale_dtype": s.scale_dtype}


class QuantLinear(_Packed):
    kind = "linear"

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, *, bias: bool = False,
                 method: str = "rtn", zero: str = "packed", has_perm: bool = False,
                 bias_dtype: torch.dtype = torch.float32, transform: dict[str, dict] | None = None) -> None:
        super().__init__(out_features, in_features, scheme, method, zero, has_perm, transform)
        self.in_features, self.out_features = in_features, out_features
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_qweight(cls, qw: QWeight, bias: torch.Tensor | None = None, method: str = "rtn") -> QuantLinear:
        """The one constructor apply.py and calibrate.py call: called on QuantLinear, it returns the
        subclass whose forward applies the QWeight's run-time transforms (LLM.int8(), incoherence)."""
        n, k = qw.codes.shape
        spec = transform_spec(qw)
        if cls is QuantLinear:
            cls = linear_class(spec)
        m = cls(k, n, qw.scheme, bias=bias is not None, method=method, zero=zero_kind(qw),
                has_perm=qw.perm is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
                transform=spec)
        m._store(qw)
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    def shape_info(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = kernels.select(self, x)          # explicit dispatch by device/shape/scheme; None = reference
        if kernel is not None:
            return kernels.run(self, x, kernel)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


class QuantConv2d(_Packed):
    """Conv2d weight (O, I/groups, kh, kw) quantized as (O, I/groups * kh * kw): groups run along the
    flattened input of each output channel."""

    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], scheme: Scheme, *,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = False, method: str = "rtn",
                 zero: str = "packed", has_perm: bool = False, bias_dtype: torch.dtype = torch.float32,
                 transform: dict[str, dict] | None = None) -> None:
        kh, kw = kernel_size
        super().__init__(out_channels, in_channels // groups * kh * kw, scheme, method, zero, has_perm,
                         transform)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.bias = (nn.Parameter(torch.zeros(out_channels, dtype=bias_dtype), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, qw: QWeight, method: str = "rtn") -> QuantConv2d:
        if cls is QuantConv2d and runtime_transforms(transform_spec(qw)):
            cls = conv_class(transform_spec(qw))      # e.g. W8A8Conv2d for an activation scale (nn_act.py)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, qw.scheme, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                method=method, zero=zero_kind(qw), has_perm=qw.perm is not None,
                bias_dtype=conv.bias.dtype if conv.bias is not None else torch.float32,
                transform=transform_spec(qw))
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
        w = self.dequantize(x.dtype).view(self.out_channels, self.in_channels // self.groups,
                                          *self.kernel_size)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantEmbedding(_Packed):
    """Embedding table (V, D) quantized per row; a lookup unpacks and dequantizes only the rows it needs."""

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, *, padding_idx=None,
                 method: str = "rtn", zero: str = "packed", has_perm: bool = False,
                 out_dtype: torch.dtype = torch.float32, transform: dict[str, dict] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, scheme, method, zero, has_perm, transform)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = out_dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, qw: QWeight, method: str = "rtn") -> QuantEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, qw.scheme, padding_idx=emb.padding_idx, method=method,
                zero=zero_kind(qw), has_perm=qw.perm is not None, out_dtype=emb.weight.dtype,
                transform=transform_spec(qw))
        m._store(qw)
        return m

    def shape_info(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        zero = None
        if self.zero_kind == "packed":
            zero = unpack(self.qzero[flat], self.scheme.bits, self.n_groups).float()
        elif self.zero_kind in FLOAT_ZEROS:
            zero = self.zero[flat].float()
        rows = QWeight(unpack(self.qcodes[flat], self.scheme.bits, self.k), self.scales()[flat], zero,
                       self.scheme, getattr(self, "perm", None))
        return dequantize_weight(rows, self.out_dtype).view(*ids.shape, self.embedding_dim)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ---- run-time variants of QuantLinear ------------------------------------------------------------------
INT_MM_CHUNK = 1024   # 1024 * 128 * 128 = 2^24: fp32 partial sums of int8 products stay exact integers


def int8_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exactly, with fp32 matmuls over K-chunks of 1024."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for k0 in range(0, a.shape[1], INT_MM_CHUNK):
        out += (a[:, k0:k0 + INT_MM_CHUNK].float() @ b[k0:k0 + INT_MM_CHUNK].float()).to(torch.int32)
    return out


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32: torch._int_mm on CUDA where its shape rules hold (M > 16,
    K and N multiples of 8), else the exact reference (CPU's _int_mm is many times slower than fp32 GEMM)."""
    m, k = a.shape
    if a.is_cuda and hasattr(torch, "_int_mm") and m > 16 and k % 8 == 0 and b.shape[1] % 8 == 0:
        return torch._int_mm(a, b.contiguous())
    return int8_matmul_reference(a, b)


INT8_GRID = IntGrid(8, signed=True)     # LLM.int8()'s activation codes: -128..127 (absmax uses -127..127)


def per_token_int8(x: torch.Tensor, zero_point: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(M, K) float -> int8 codes (M, K), scales (M, 1) and integer zero points (M, 1) int32 or None, with
    x ~ scale * (code - zero). absmax: codes -127..127, zero 0 (bitsandbytes' Linear8bitLt). zeropoint
    (the paper's asymmetric variant): each token's [min, max], widened to hold 0 so that the zeroed outlier
    columns stay exactly 0, spread over all 256 codes; a token whose ordinary features lean to one sign
    gets up to twice absmax's resolution. Round half to even in both (torch.round, as bitsandbytes).
    The grid math is the project's one affine quantizer (primitives.choose_qparams / quantize), per row."""
    scale, zero = choose_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), INT8_GRID,
                                 symmetric=not zero_point)
    q = quantize(x, scale, zero, INT8_GRID).to(torch.int8)
    return q, scale, zero.to(torch.int32) if zero_point else None


class Int8MixedLinear(QuantLinear):
    """LLM.int8() (Dettmers et al. 2022): int8 row-wise weights; per forward, input columns where any
    |x| > `outlier_threshold` go through a float matmul with those weight columns, the rest through
    int8 x int8 with per-token absmax scales (this class, bitsandbytes' scheme) or per-token zero points
    (Int8ZeroPointLinear)."""

    kind = "linear_int8"
    TRANSFORMS: tuple[str, ...] = ("outlier_threshold",)
    ZERO_POINT = False

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, **kw) -> None:
        if scheme.bits != 8 or not scheme.symmetric or scheme.grid != "int" or scheme.group_size is not None:
            raise BitsmithError(f"LLM.int8() needs symmetric 8-bit per-channel int weights, "
                                f"got {scheme.label()}")
        super().__init__(in_features, out_features, scheme, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.k).float()                                    # (M, K)
        outliers = (x2.abs() > self.outlier_threshold).any(0)                 # (K,) outlier input columns
        w8 = (self.qcodes ^ 128).view(torch.int8)                             # (N, K): unsigned code - 128
        sw = self.scales().float().view(1, -1)                                # (1, N) row scales
        xq, sx, zx = per_token_int8(x2.masked_fill(outliers, 0.0), self.ZERO_POINT)   # (M, K), (M, 1) x2
        acc = int8_matmul(xq, w8.t())                                         # (M, N) int32
        if zx is not None:        # sum_k (q - z) w = q @ w - z * rowsum(w), all in int32 (|.| < 2^31)
            acc = acc - zx * w8.sum(1, dtype=torch.int32).view(1, -1)
        y = acc.float() * sx * sw                                             # (M, N)
        if bool(outliers.any()):
            cols = outliers.nonzero().squeeze(1)
            y = y + x2[:, cols] @ (w8[:, cols].float() * sw.t()).t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Int8ZeroPointLinear(Int8MixedLinear):
    """LLM.int8() with the paper's zeropoint per-token activations (see per_token_int8). The one-byte
    `act_zero_point` transform marks the choice in the checkpoint; its value is not read."""

    kind = "linear_int8_zp"
    TRANSFORMS = ("outlier_threshold", "act_zero_point")
    ZERO_POINT = True


class HadamardLinear(QuantLinear):
    """Incoherence processing (QuIP#): the codes describe W' = U W V^T with random-sign Hadamards U, V;
    y = W x = U^T (W' (V x)): the input transform V runs on the activations, the output transform U^T on
    the result, each a fast Walsh-Hadamard (O(d log d) per token) next to the O(N K) matmul."""

    kind = "linear_hadamard"
    TRANSFORMS = ("had_in", "had_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = random_hadamard(x, unpack_signs(self.had_in, self.k))                        # V x
        w = dequantize_weight(dataclasses.replace(self.qweight(), transform=None), x.dtype)  # W' (N, K)
        y = random_hadamard(F.linear(xt, w), unpack_signs(self.had_out, self.n), inverse=True)  # U^T (W' V x)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class InputScaledLinear(QuantLinear):
    """AWQ's run-time input scale, for layers whose scale no preceding op can absorb (o_proj under GQA):
    the codes describe W diag(s) and `input_scale` = 1/s, so y = (W diag(s)) (x / s) = W x."""

    kind = "linear_input_scaled"
    TRANSFORMS = ("input_scale",)
    BEFORE_KERNEL = ("input_scale",)      # x / s first; then the codes are an ordinary weight for kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x * self.input_scale.to(x.dtype)
        kernel = kernels.select(self, xs)
        if kernel is not None:
            return kernels.run(self, xs, kernel)
        w = dequantize_weight(dataclasses.replace(self.qweight(), transform=None), x.dtype)   # W diag(s)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xs, w, bias)


QUANT_MODULES = {"linear": QuantLinear, "conv2d": QuantConv2d, "embedding": QuantEmbedding,
                 "linear_int8": Int8MixedLinear, "linear_int8_zp": Int8ZeroPointLinear,
                 "linear_hadamard": HadamardLinear,
                 "linear_input_scaled": InputScaledLinear}
LINEAR_CLASSES = (QuantLinear, Int8MixedLinear, Int8ZeroPointLinear, HadamardLinear, InputScaledLinear)


def linear_class(spec: dict, classes: tuple | None = None, what: str = "linear") -> type[QuantLinear]:
    """The linear (or, given CONV_CLASSES, conv) module class whose forward applies exactly the run-time
    transforms in `spec`."""
    wanted = runtime_transforms(spec)
    for cls in classes or LINEAR_CLASSES:
        if set(cls.TRANSFORMS) == wanted:
            return cls
    raise BitsmithError(f"no quantized {what} module applies the transform(s) {', '.join(sorted(wanted))}")


# activation-quantized variants (W8A8, FP8 activations) live in nn_act.py, which imports this module
from .nn_act import ACT_CONV_CLASSES, ACT_LINEAR_CLASSES  # noqa: E402

LINEAR_CLASSES += ACT_LINEAR_CLASSES
CONV_CLASSES = (QuantConv2d, *ACT_CONV_CLASSES)
QUANT_MODULES.update({c.kind: c for c in (*ACT_LINEAR_CLASSES, *ACT_CONV_CLASSES)})


def conv_class(spec: dict) -> type[QuantConv2d]:
    """The conv module class whose forward applies exactly the run-time transforms in `spec`."""
    return linear_class(spec, CONV_CLASSES, "conv")


def build_empty(info: dict, dtype: torch.dtype = torch.float32) -> _Packed:
    """An empty module of the recorded kind and shape, ready for `load_state_dict`."""
    scheme = Scheme(**info["scheme"])
    common = {"method": info["method"], "zero": info["zero"], "has_perm": info["perm"],
              "transform": info.get("transform")}
    if info["type"] in {c.kind for c in LINEAR_CLASSES}:
        return QUANT_MODULES[info["type"]](info["in_features"], info["out_features"], scheme,
                                           bias=info["bias"], bias_dtype=dtype, **common)
    if info["type"] in {c.kind for c in CONV_CLASSES}:
        pad = info["padding"]
        conv = QUANT_MODULES[info["type"]]
        return conv(info["in_channels"], info["out_channels"], tuple(info["kernel_size"]), scheme,
                    stride=tuple(info["stride"]), padding=pad if isinstance(pad, str) else tuple(pad),
                    dilation=tuple(info["dilation"]), groups=info["groups"], bias=info["bias"],
                    bias_dtype=dtype, **common)
    if info["type"] == "embedding":
        return QuantEmbedding(info["num_embeddings"], info["embedding_dim"], scheme,
                              padding_idx=info["padding_idx"], out_dtype=dtype, **common)
    raise ValueError(f"unknown quantized module type {info['type']!r}")
