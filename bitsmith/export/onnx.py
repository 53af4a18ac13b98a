"""ONNX export: a quantized model as an ONNX graph that ONNX Runtime runs, with bitsmith's own codes.

Two modes. `matmulnbits` (LLMs, weight-only 2/4/8-bit): each quantized linear becomes ONNX Runtime's
com.microsoft `MatMulNBits`: B (N, K/block, block*bits/8) uint8 holds the codes of every output row as one
LSB-first bit stream cut into blocks (exactly bitsmith's `pack` of the row), scales (N * blocks) float,
zero points packed at `bits` per row the same way; bitsmith's groups become blocks (a group that is not a
power of two >= 16, or per-channel scales, is written as several blocks sharing the group's scale, which
is exact). `qdq` (CNNs, encoders: static W8A8): int8 weights per output channel as DequantizeLinear of the
codes, and a QuantizeLinear/DequantizeLinear pair on each quantized layer's input with a static
per-tensor scale from a min-max pass over calibration data (`observers.input_ranges`), the pattern ONNX
Runtime fuses into integer kernels. The float rest of the graph comes from torch.onnx's dynamo exporter:
the quantized modules are swapped for modules that emit these nodes (`torch.onnx.ops.symbolic`) during
export and compute the same numbers in torch otherwise (the reference the tests compare against).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitsmithError
from ..models import LoadedModel
from ..nn import (
    HadamardLinear,
    InputScaledLinear,
    Int8MixedLinear,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    _Packed,
)
from ..numerics import IntGrid
from ..packing import pack
from ..primitives import QWeight, choose_qparams, dequantize, quantize, symmetric_zero

log = logging.getLogger(__name__)

OUTPUT_IS_DIR = True
MODEL_FILE = "model.onnx"
EXTRA = "pip install 'bitsmith[onnx]'"
MODES = ("auto", "matmulnbits", "qdq")
DEFAULT_OPSET = 18            # QuantizeLinear/DequantizeLinear with per-axis scales; ONNX Runtime >= 1.14
NBITS = (2, 4, 8)             # the widths ONNX Runtime's MatMulNBits kernels take
MAX_BLOCK = 128
EXTERNAL_BYTES = 1 << 30      # above this, initializers go to model.onnx.data (the protobuf limit is 2 GB)


def _require_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as err:
        raise BitsmithError(f"ONNX export needs onnx and onnxscript: {EXTRA}") from err
    return onnx


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
        self.register_buffer("input_scale", mod.input_scale.float() if isinstance(mod, InputScaledLinear) else None)
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
    transform = {k: v for k, v in (qw.transform or {}).items() if k != "act_scale"}   # the scale is the input's
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


def _qdq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear (per-tensor; uint8 or int8 after the zero point's dtype): the
    node pair in the graph, the same math (round half to even, saturate) in torch."""
    if torch.onnx.is_in_onnx_export():
        q = torch.onnx.ops.symbolic("::QuantizeLinear", (x, scale, zero), dtype=zero.dtype, shape=x.shape,
                                    version=DEFAULT_OPSET)
        return torch.onnx.ops.symbolic("::DequantizeLinear", (q, scale, zero), dtype=x.dtype, shape=x.shape,
                                       version=DEFAULT_OPSET)
    z = zero.float()
    grid = IntGrid(8, signed=zero.dtype == torch.int8)
    return dequantize(quantize(x, scale, z, grid), scale, z).to(x.dtype)


def static_act_qparams(mod: _Packed) -> tuple[torch.Tensor, torch.Tensor] | None:
    """bitsmith's own static activation scale of a W8A8 module (issue 7: symmetric int8, zero 0) as
    QuantizeLinear parameters; None for a weight-only module (its range comes from a min-max pass)."""
    spec = mod.transform_spec or {}
    if "fp8_act_scale" in spec:
        raise BitsmithError(f"{type(mod).__name__}: FP8 activations have no int8 QDQ form; export weight-only")
    if "act_scale" not in spec:
        return None
    s = mod.act_scale.reshape(-1)[0].float()
    if not float(s) > 0:
        raise BitsmithError("dynamic per-token activation scales have no static QDQ form; quantize with static "
                            "activation scales (calibrated w8a8) or export weight-only (--option mode=matmulnbits)")
    # bitsmith clamps codes to +-127, QuantizeLinear to [-128, 127]: they differ only below -127.5 s, outside
    # the calibrated range
    return s.reshape(()), torch.zeros((), dtype=torch.int8)


class QDQModule(nn.Module):
    """Stands in for an 8-bit QuantLinear / QuantConv2d during export: static input Q/DQ, weight
    DequantizeLinear(codes, per-channel scale and zero, axis 0), then the float MatMul / Conv."""

    def __init__(self, mod: _Packed, act_scale: torch.Tensor, act_zero: torch.Tensor) -> None:
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
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().float(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return torch.onnx.ops.symbolic("::DequantizeLinear", (self.codes, self.w_scale, self.w_zero), {"axis": 0},
                                           dtype=torch.float32, shape=self.codes.shape, version=DEFAULT_OPSET)
        view = [-1] + [1] * (self.codes.dim() - 1)
        return (self.codes.float() - self.w_zero.float().view(view)) * self.w_scale.view(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _qdq(x, self.x_scale, self.x_zero)
        if self.conv:
            return F.conv2d(x, self.weight(), self.bias, *self.conv_args)
        return F.linear(x, self.weight(), self.bias)


# ---- module swapping ----------------------------------------------------------------------------------
def _export_module(name: str, mod: nn.Module, mode: str, ranges: dict | None, notes: list[str]) -> nn.Module | None:
    """The stand-in for one quantized module, or None to leave it as it is."""
    if isinstance(mod, HadamardLinear):
        raise BitsmithError(f"{name}: incoherence-processed (Hadamard) layers have no ONNX form here; "
                            "export them to safetensors (bitsmith save) or re-quantize without incoherence")
    if isinstance(mod, QuantEmbedding):
        notes.append(f"{name}: quantized embedding written dequantized (float)")
        emb = nn.Embedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx)
        emb.weight.data.copy_(mod.dequantize(torch.float32))
        return emb
    if mode == "matmulnbits":
        if isinstance(mod, QuantConv2d):
            raise BitsmithError(f"{name}: MatMulNBits is for linears; export CNNs with --onnx-mode qdq")
        if isinstance(mod, Int8MixedLinear):
            notes.append(f"{name}: LLM.int8() layer written weight-only (activations stay float)")
        return MatMulNBitsLinear(mod)
    own = static_act_qparams(mod)
    if own is not None:
        return QDQModule(mod, *own)
    if name not in ranges:
        raise BitsmithError(f"{name}: the calibration data never reached this layer, so it has no activation "
                            "range; pass calibration inputs that run the whole model")
    return QDQModule(mod, *activation_qparams(*ranges[name]))


def swap_for_export(model: nn.Module, mode: str, ranges: dict | None = None) -> tuple[list, list[str]]:
    """Replace every bitsmith module by its export stand-in; returns (undo list, notes)."""
    from ..select import set_submodule

    undo, notes = [], []
    try:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, _Packed):
                new = _export_module(name, mod, mode, ranges, notes)
                set_submodule(model, name, new)
                undo.append((name, mod))
    except BaseException:
        restore(model, undo)            # a layer that cannot be exported leaves the model as it was
        raise
    if not undo:
        raise BitsmithError("the model has no bitsmith-quantized layers; quantize it first (bitsmith quantize)")
    return undo, notes


def restore(model: nn.Module, undo: list) -> None:
    from ..select import set_submodule

    for name, mod in undo:
        set_submodule(model, name, mod)


# ---- graph wrappers and export ------------------------------------------------------------------------
class _CausalLogits(nn.Module):
    """input_ids (B, T) -> logits (B, T, V), without a KV cache (the graph is the full forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class _EncoderHidden(nn.Module):
    """input_ids, attention_mask (B, T) -> last_hidden_state (B, T, D)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _graph(loaded: LoadedModel, example: tuple | None) -> tuple[nn.Module, tuple, list[str], list[str], dict]:
    """(module, example inputs, input names, output names, dynamic shapes) of the exported graph."""
    dim = torch.export.Dim
    if loaded.kind == "causal-lm":
        ids = example[0] if example else torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 2)   # batch 2: export keeps it dynamic
        return (_CausalLogits(loaded.model), (ids,), ["input_ids"], ["logits"],
                {"input_ids": {0: dim("batch", max=1024), 1: dim("sequence", max=1 << 16)}})
    if loaded.kind == "encoder":
        ids = example[0] if example else torch.tensor([[101, 2023, 2003, 1037, 3231, 102]] * 2)
        mask = example[1] if example and len(example) > 1 else torch.ones_like(ids)
        dyn = {0: dim("batch", max=1024), 1: dim("sequence", max=1 << 16)}
        return (_EncoderHidden(loaded.model), (ids, mask), ["input_ids", "attention_mask"], ["last_hidden_state"],
                {"input_ids": dyn, "attention_mask": dyn})
    if not example:
        raise BitsmithError(f"exporting a {loaded.kind} model needs example inputs (example=(tensor,))")
    names = [f"input{i}" if len(example) > 1 else "input" for i in range(len(example))]
    return loaded.model, tuple(example), names, ["output"], tuple({0: dim("batch", max=1 << 16)} for _ in example)


def default_calibration(loaded: LoadedModel, n: int = 16, max_tokens: int = 128) -> list[tuple]:
    """Calibration inputs for an encoder's activation ranges: the first n paragraphs of bitsmith's default
    calibration text, one at a time (no padding tokens skew the ranges)."""
    if loaded.kind != "encoder" or loaded.tokenizer is None:
        raise BitsmithError("QDQ export of this model needs calibration inputs (calibration=[...])")
    from ..models import load_text

    paras = [p for p in load_text(None)[0].split("\n\n") if len(p.strip()) > 40][:n]
    out = []
    for p in paras:
        enc = loaded.tokenizer(p, truncation=True, max_length=max_tokens, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def input_ranges(model: nn.Module, names: list[str], graph: nn.Module, batches: list[tuple]) -> dict:
    from ..observers import input_ranges as observe

    mods = {n: model.get_submodule(n) for n in names}
    return observe(mods, lambda b: graph(*b), batches)


def _flag(value: Any, name: str) -> bool | None:
    """A bool option that may come from the CLI as text (--option external_data=true)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BitsmithError(f"option {name} takes true or false, got {value!r}")


def write(loaded: LoadedModel, tmp_path: Path, *, mode: str = "auto", opset: int | str = DEFAULT_OPSET,
          external_data: bool | str | None = None, example: tuple | None = None,
          calibration: list | None = None) -> dict:
    """Write `model.onnx` (and `model.onnx.data` when external) plus the tokenizer under tmp_path.
    mode: auto (causal LMs -> matmulnbits, the rest -> qdq) | matmulnbits | qdq; external_data: None =
    only when the weights pass 1 GB; example: the graph's example inputs (needed for non-HF modules);
    calibration: inputs for the QDQ activation ranges (default for encoders: bitsmith's calibration text)."""
    onnx = _require_onnx()
    try:
        opset = int(opset)
    except ValueError as err:
        raise BitsmithError(f"option opset takes an integer, got {opset!r}") from err
    external_data = _flag(external_data, "external_data")
    if mode not in MODES:
        raise BitsmithError(f"unknown ONNX mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "matmulnbits" if loaded.kind == "causal-lm" else "qdq"
    if opset < 13:
        raise BitsmithError(f"opset {opset} is too old for per-channel DequantizeLinear; use --opset 13 or newer")
    model = loaded.model.eval()
    graph, ex, in_names, out_names, dynamic = _graph(loaded, example)
    graph.eval()
    ranges = None
    if mode == "qdq":
        names = [n for n, m in model.named_modules()
                 if isinstance(m, (QuantLinear, QuantConv2d)) and static_act_qparams(m) is None]
        ranges = {}
        if names:                            # weight-only layers: static ranges from a min-max pass
            batches = calibration if calibration is not None else default_calibration(loaded)
            ranges = input_ranges(model, names, graph, [b if isinstance(b, tuple) else (b,) for b in batches])
    undo, notes = swap_for_export(model, mode, ranges)
    try:
        nbytes = sum(t.numel() * t.element_size() for t in [*graph.parameters(), *graph.buffers()])
        external = nbytes > EXTERNAL_BYTES if external_data is None else bool(external_data)
        with torch.no_grad():
            program = torch.onnx.export(graph, ex, dynamo=True, input_names=in_names, output_names=out_names,
                                        dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                                        external_data=external)
        if program is None:  # pragma: no cover - dynamo=True always returns a program
            raise BitsmithError("torch.onnx.export returned no program")
        tmp_path.mkdir(parents=True, exist_ok=True)
        path = tmp_path / MODEL_FILE
        program.save(str(path), external_data=external)
    except BitsmithError:
        raise
    except Exception as err:
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BitsmithError(f"torch.onnx could not export {loaded.name}: {line}") from err
    finally:
        restore(model, undo)
    onnx.checker.check_model(str(path))          # by path: works past the 2 GB protobuf limit
    if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(str(tmp_path))
    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    files = sorted(p.name for p in tmp_path.iterdir())
    return {"format": "onnx", "mode": mode, "file": MODEL_FILE, "opset": opset, "external_data": external,
            "inputs": in_names, "outputs": out_names, "quantized_layers": len(undo),
            "nodes": {k: ops[k] for k in ("MatMulNBits", "QuantizeLinear", "DequantizeLinear") if k in ops},
            "bytes": sum((tmp_path / f).stat().st_size for f in files if (tmp_path / f).is_file()),
            "files": files, "notes": notes}
