"""GGUF export for llama.cpp (Llama-family decoders: Llama / SmolLM, Mistral, Qwen2), written with the
`gguf` package's GGUFWriter.

Per 2-D weight the tensor type follows llama.cpp's own rules for the requested file type (K_M mixes put
Q6_K on some attn_v / ffn_down layers; the output head or the tied embedding gets Q6_K; a row length that
is not a whole number of 256-blocks falls back as llama-quantize does: Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0). A quantized layer whose QWeight already lies on that type's grid is *repacked* (codes and
scales carried over exactly, `gguf_blocks.from_qweight`); any other layer is re-encoded from its
dequantized weight, with a warning and the measured SQNR when it was quantized already. Q and K rows are
permuted the way llama.cpp's converter does for Llama (its rotary embedding pairs x[i] with x[i + d/2]).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BitsmithError
from ..nn import QuantEmbedding, QuantLinear
from ..primitives import QWeight
from . import gguf_blocks as gb
from . import require

log = logging.getLogger(__name__)

OUTPUT_IS_DIR = False
GGUF_SOURCE_ATTR = "bitsmith_gguf_source"      # set on models imported from a .gguf (tokenizer copied from it)
# HF model_type -> llama.cpp architecture, and whether Q/K rows are permuted for llama.cpp's rotary layout
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
FILE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K",
              "Q5_K_S", "Q5_K_M", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}    # llama-quantize, for K % 256 != 0
_FTYPE_ENUM = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_K": "MOSTLY_Q4_K_S",
               "Q5_K": "MOSTLY_Q5_K_S"}


# ---- which type each tensor gets ------------------------------------------------------------------------
def base_type(ftype: str) -> str:
    return {"Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}.get(ftype, ftype)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(ftype: str, gguf_name: str, k: int, n_layers: int, *, is_output: bool) -> str:
    """The GGML type of a 2-D weight with rows of k values under file type `ftype`."""
    if ftype in FLOAT_TYPES:
        return ftype
    t = base_type(ftype)
    if is_output and ftype != "Q8_0":
        t = "Q6_K"
    elif ftype.endswith("_M") or ftype == "Q4_K_S":
        layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
        v, down = ".attn_v." in gguf_name, ".ffn_down." in gguf_name
        if ftype.endswith("_M") and (v or down) and _more_bits(layer, n_layers):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and ((v and layer < 4) or (down and layer < n_layers // 8)):
            t = "Q5_K"
    if k % gb.BLOCK_TYPES[t].block_size:
        t = K_FALLBACK.get(t, t)
    if k % gb.BLOCK_TYPES[t].block_size:
        return "F16"
    return t


def natural_type(qw: QWeight) -> str | None:
    """The GGUF type a QWeight repacks into as it is, or None."""
    for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"):
        if gb.lossless_reason(qw, t) is None:
            return t
    return None


def _default_type(qw: QWeight | None) -> str:
    """With no --type: each quantized layer keeps its own grid where GGUF has it, else the nearest type."""
    if qw is None:
        return "F16"
    t = natural_type(qw)
    if t is not None:
        return t
    s = qw.scheme
    if s.grid == "int" and s.bits in (4, 5):
        return f"Q{s.bits}_{0 if s.symmetric else 1}"
    return "Q8_0" if s.bits >= 6 or s.grid != "int" else "Q4_1"


# ---- tensors ------------------------------------------------------------------------------------------
def _row_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K permute: rows (head, 2, d/2) -> (head, d/2, 2), as an index on the rows."""
    return torch.arange(n_rows).view(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def permute_rows(qw: QWeight, idx: torch.Tensor) -> QWeight:
    return QWeight(qw.codes[idx], qw.scale[idx], None if qw.zero is None else qw.zero[idx], qw.scheme, qw.perm,
                   qw.transform)


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB, rounded to 0.01; None when approx is exact (JSON has no inf)."""
    err = float(((ref.float() - approx.float()) ** 2).sum())
    sig = float((ref.float() ** 2).sum())
    return None if err == 0 else round(10 * math.log10(max(sig, 1e-30) / err), 2)


def encode_tensor(w: torch.Tensor | None, qw: QWeight | None, gtype: str, name: str) -> tuple[Any, str, dict]:
    """(numpy data for GGUFWriter, GGML type, report) of one 2-D weight: repacked when qw lies on gtype's
    grid, else encoded from the float weight (dequantized when only qw is given)."""
    import numpy as np

    if qw is not None and gtype in gb.BLOCK_TYPES and gb.lossless_reason(qw, gtype) is None:
        data = gb.from_qweight(qw, gtype)
        rep = {"type": gtype, "path": "lossless"}
        if qw.zero is not None:      # codes and scales exact; the min -zero*scale is stored at the type's precision
            from ..primitives import dequantize_weight

            rep["sqnr_db"] = _sqnr_db(dequantize_weight(qw), gb.dequantize_blocks(data, gtype, qw.shape))
        return data.numpy(), gtype, rep
    if w is None:
        from ..primitives import dequantize_weight

        w = dequantize_weight(qw)
    w = w.detach().float()
    if gtype == "F32":
        return w.numpy(), gtype, {"type": gtype, "path": "float"}
    if gtype in ("F16", "BF16"):
        dt = torch.float16 if gtype == "F16" else torch.bfloat16
        approx = w.to(dt)
        arr = approx.numpy() if gtype == "F16" else approx.view(torch.int16).numpy().view(np.uint16)
        rep = {"type": gtype, "path": "float", "sqnr_db": _sqnr_db(w, approx.float())}
        return arr, gtype, rep
    data = gb.encode(w, gtype, name)
    rep = {"type": gtype, "path": "re-encoded" if qw is not None else "quantized",
           "sqnr_db": _sqnr_db(w, gb.dequantize_blocks(data, gtype, tuple(w.shape)))}
    if qw is not None:
        rep["why"] = gb.lossless_reason(qw, gtype) if gtype in gb.BLOCK_TYPES else "float type"
    return data.numpy(), gtype, rep


def _module_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor | None, QWeight | None]]:
    """HF state-dict name -> (float tensor, QWeight) for every tensor the GGUF needs (one of the two is set)."""
    out: dict[str, tuple[torch.Tensor | None, QWeight | None]] = {}
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            # Run-time transforms (AWQ input scale, Hadamard) have no GGUF form: lossless_reason sends such
            # layers to the re-encode path, whose dequantize_weight folds the transform into W.
            out[prefix + "weight"] = (None, mod.qweight())
            if getattr(mod, "bias", None) is not None:
                out[prefix + "bias"] = (mod.bias, None)
            continue
        for pname, p in mod.named_parameters(recurse=False):
            out[prefix + pname] = (p, None)
    return out


# ---- metadata -----------------------------------------------------------------------------------------
def check_architecture(model: nn.Module) -> tuple[str, bool, Any]:
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in ARCHS:
        supported = ", ".join(ARCHS)
        raise BitsmithError(f"GGUF export supports the Llama-family decoders {supported}; this model is "
                            f"{mtype or type(model).__name__}")
    arch, permute = ARCHS[mtype]
    return arch, permute, cfg


def _write_hparams(w: Any, cfg: Any, gguf: Any) -> None:
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in (None, "default"):
        if kind != "linear":
            raise BitsmithError(f"GGUF export supports linear rope scaling only; this model uses {kind!r}")
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_vocab_size(cfg.vocab_size)


def _copy_tokenizer_fields(w: Any, src: Path, gguf: Any) -> None:
    """Copy every tokenizer.* key of another GGUF (the one a model was imported from) verbatim."""
    from ..importers.gguf import read_gguf

    reader = read_gguf(src)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, field.contents())
        else:
            w.add_key_value(key, field.contents(), vtype)


def _bpe_pre(tokenizer_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, None when it is not one we know:
    a plain GPT-2 ByteLevel split is llama.cpp's "default"; digits split one by one before it is SmolLM's
    (StarCoder's, ...: one regex in llama.cpp)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "default"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    return None


def _write_tokenizer(w: Any, loaded: Any, gguf: Any, warnings: list[str]) -> None:
    src = getattr(loaded.model, GGUF_SOURCE_ATTR, None)
    if src is not None and Path(src).is_file():
        _copy_tokenizer_fields(w, Path(src), gguf)
        return
    d = Path(loaded.source_dir) if loaded.source_dir is not None else None
    if d is None or not (d / "tokenizer.json").is_file():
        raise BitsmithError("GGUF export needs the model's tokenizer.json (byte-level BPE) beside it; "
                            f"none in {d}")
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    if (tj.get("model") or {}).get("type") != "BPE":
        raise BitsmithError("GGUF export supports byte-level BPE tokenizers (tokenizer.json); "
                            f"{d / 'tokenizer.json'} is {(tj.get('model') or {}).get('type')}")
    vocab = gguf.vocab.BpeVocab(d)
    tokens, toktypes = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        toktypes.append(ttype)
    w.add_tokenizer_model("gpt2")
    pre = _bpe_pre(tj)
    if pre is None:
        warnings.append("tokenizer pre-tokenizer not recognised; llama.cpp will split text its GPT-2 default "
                        "way (token ids fed directly are unaffected)")
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    gguf.vocab.SpecialVocab(d, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)


def validate_options(type: str | None = None) -> None:  # noqa: A002 - the CLI's --type
    if type is not None and str(type).upper() not in FILE_TYPES:
        raise BitsmithError(f"unknown GGUF type {type!r}; types: {', '.join(FILE_TYPES)}")


# ---- write --------------------------------------------------------------------------------------------
def write(loaded: Any, tmp_path: Path, *, type: str | None = None) -> dict:  # noqa: A002 - the CLI's --type
    """Write `loaded` as GGUF to `tmp_path`; returns {"type", "tensors": {name: report}, "warnings"}."""
    gguf = require("gguf", "gguf")
    import gguf.vocab  # noqa: F401 - submodule used by _write_tokenizer

    validate_options(type)
    ftype = None if type is None else str(type).upper()
    model = loaded.model
    arch, permute, cfg = check_architecture(model)
    n_layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tensors = _module_tensors(model)
    tied = "lm_head.weight" not in tensors or _same_tensor(model)
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    warnings: list[str] = []
    report: dict[str, dict] = {}
    writer = gguf.GGUFWriter(str(tmp_path), arch)
    writer.add_name(str(getattr(loaded, "name", None) or arch))
    _write_hparams(writer, cfg, gguf)
    writer.add_file_type(int(gguf.LlamaFileType[_FTYPE_ENUM.get(ftype or "", f"MOSTLY_{ftype}")])
                         if ftype else int(gguf.LlamaFileType.GUESSED))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, loaded, gguf, warnings)
    for hf_name, (w, qw) in tensors.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise BitsmithError(f"GGUF export: no llama.cpp name for tensor {hf_name} of {arch}")
        shape = tuple(qw.shape) if qw is not None else tuple(w.shape)
        if len(shape) == 1:
            writer.add_tensor(gname, w.detach().float().numpy())
            continue
        if permute and gname.split(".")[-2] in ("attn_q", "attn_k"):
            heads = n_head if gname.split(".")[-2] == "attn_q" else n_kv
            idx = _row_permutation(shape[0], heads)
            w, qw = (None if w is None else w[idx]), (None if qw is None else permute_rows(qw, idx))
        is_output = gname == "output.weight" or (gname == "token_embd.weight" and tied)
        gtype = (tensor_type(ftype, gname, shape[1], n_layers, is_output=is_output) if ftype
                 else _default_type(qw))
        if gtype in gb.BLOCK_TYPES and shape[1] % gb.BLOCK_TYPES[gtype].block_size:
            gtype = "F16"
        data, gtype, rep = encode_tensor(w, qw, gtype, hf_name)
        if rep["path"] == "re-encoded":
            warnings.append(f"{hf_name}: re-encoded as {gtype} from dequantized weights ({rep['why']}); "
                            f"SQNR {rep['sqnr_db'] if rep['sqnr_db'] is not None else 'exact'} dB")
        report[gname] = rep
        raw = None if gtype in FLOAT_TYPES else gguf.GGMLQuantizationType[gtype]
        if gtype == "BF16":
            raw = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(gname, data, raw_dtype=raw)
    for msg in warnings:
        log.warning(msg)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    lossless = sum(r["path"] == "lossless" for r in report.values())
    return {"type": ftype or "per-layer", "architecture": arch, "tensors": report, "lossless": lossless,
            "re_encoded": sum(r["path"] == "re-encoded" for r in report.values()), "warnings": warnings}


def _same_tensor(model: nn.Module) -> bool:
    """True when the output head is the embedding (tied: written once, as token_embd): the same float
    tensor, or a quantized head holding exactly the embedding's codes and scales (an imported tied GGUF)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or emb is None:
        return False
    if isinstance(head, QuantLinear) and isinstance(emb, QuantEmbedding):
        a, b = head.qweight(), emb.qweight()
        return (a.scheme == b.scheme and torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
                and (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero)))
    if isinstance(head, QuantLinear) or isinstance(emb, QuantEmbedding):
        return False
    return head.weight is emb.weight
