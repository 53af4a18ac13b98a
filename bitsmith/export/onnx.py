"""ONNX export: a quantized model as an ONNX graph that ONNX Runtime runs, with bitsmith's own codes.

Two modes. `matmulnbits` (LLMs, weight-only 2/4/8-bit): each quantized linear becomes ONNX Runtime's
com.microsoft `MatMulNBits`: B (N, K/block, block*bits/8) uint8 holds the codes of every output row as one
LSB-first bit stream cut into blocks (exactly bitsmith's `pack` of the row), scales (N * blocks) float,
zero points packed at `bits` per row the same way; bitsmith's groups become blocks (a group that is not a
power of two >= 16, or per-channel scales, is written as several blocks sharing the group's scale, which
is exact). `qdq` (CNNs, encoders: static W8A8): int8 weights per output channel as DequantizeLinear of the
codes, and a QuantizeLinear/DequantizeLinear pair on each quantized layer's input with a static
per-tensor scale: a W8A8 layer's own calibrated scale, or for weight-only layers one from a min-max pass
over calibration data (`observers.input_ranges`); the pattern ONNX Runtime fuses into integer kernels.
The float rest of the graph comes from torch.onnx's dynamo exporter: the quantized modules are swapped,
for the export only, for stand-ins (onnx_nodes.py) that emit these nodes (`torch.onnx.ops.symbolic`) and
compute the same numbers in torch otherwise (the reference the tests compare against).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BitsmithError
from ..models import LoadedModel
from ..nn import HadamardLinear, Int8MixedLinear, QuantConv2d, QuantEmbedding, QuantLinear, _Packed
from .onnx_nodes import (  # noqa: F401  (re-exported: the tests and later W8A8 work use them from here)
    DEFAULT_OPSET,
    MatMulNBitsLinear,
    QDQModule,
    activation_qparams,
    dequantize_matmulnbits,
    matmulnbits_tensors,
    static_act_qparams,
)

log = logging.getLogger(__name__)

OUTPUT_IS_DIR = True
MODEL_FILE = "model.onnx"
EXTRA = "pip install 'bitsmith[onnx]'"
MODES = ("auto", "matmulnbits", "qdq")
EXTERNAL_BYTES = 1 << 30      # above this, initializers go to model.onnx.data (the protobuf limit is 2 GB)


def _require_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as err:
        raise BitsmithError(f"ONNX export needs onnx and onnxscript: {EXTRA}") from err
    return onnx


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
        codes = mod.qweight().codes
        if int(codes.max()) > 128 + 64 or int(codes.min()) < 128 - 64:
            note = ("full-range int8 weights: ONNX Runtime's int8 kernels saturate on x86 CPUs without VNNI; "
                    "quantize with w8a8 reduce_range for exact results there")
            if note not in notes:
                notes.append(note)
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
