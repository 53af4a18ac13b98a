"""compressed-tensors export: a Hugging Face directory in the `pack-quantized` format, which transformers
(with the `compressed-tensors` package) and vLLM load without custom code.

Per quantized linear `name`: `name.weight_packed` int32 (N, ceil(K*bits/32)) holds each row's codes as one
dense LSB-first bit stream (the package stores signed codes and packs code + 2^(bits-1), which is exactly
bitsmith's unsigned code, so the bytes are bitsmith's `pack` of the row, padded to whole int32 words);
`name.weight_scale` (N, G); `name.weight_shape` [N, K]; asymmetric layers add `name.weight_zero_point`,
the unsigned zero points packed the same way along the output dimension, int32 (ceil(N*bits/32), G).
`config.json` gets a `quantization_config` (quant_method "compressed-tensors", format "pack-quantized")
with one config group per distinct weight scheme, targeting the layers by name.

Those asymmetric tensors are byte-identical to what compressed-tensors' own compressor writes (and what vLLM
reads), but compressed-tensors 0.18 to 0.20.1 cannot load them into transformers' default (compressed)
model: `PackedQuantizationCompressor.compress` on meta tensors (how transformers builds the model) keeps
the zero point at its unpacked init shape (N, G), so the packed checkpoint tensor is a size mismatch.
`asym_strategy="block"` writes asymmetric layers as the same codes under strategy block [1, group], whose
zero point compressed-tensors stores unpacked (signed int8, zero - 2^(bits-1)); transformers loads that
by default, vLLM has no int-weight block scheme.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import BitsmithError
from ..models import LoadedModel
from ..nn import Int8MixedLinear, QuantLinear, _Packed
from ..packing import pack
from ..primitives import QWeight
from .hf_dir import hf_config, quantized_linears, unquantized_state, write_dir

OUTPUT_IS_DIR = True
FORMAT = "pack-quantized"
ASYM_STRATEGIES = ("group", "block")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) unsigned codes -> (R, ceil(C*bits/32)) int32: bitsmith's row bit stream in whole words
    (little-endian words, as the package's own packing produces on every machine torch runs on)."""
    if sys.byteorder != "little":  # pragma: no cover - torch has no big-endian CPU builds in practice
        raise BitsmithError("compressed-tensors export needs a little-endian machine")
    cols = codes.shape[1]
    words = -(-cols * bits // 32)
    packed = pack(codes.to(torch.uint8), bits)                          # (R, ceil(C*bits/8)) uint8
    return F.pad(packed, (0, 4 * words - packed.shape[1])).contiguous().view(torch.int32)


def validate_options(asym_strategy: str = "group") -> None:
    if asym_strategy not in ASYM_STRATEGIES:
        raise BitsmithError(f"option asym_strategy must be group or block, got {asym_strategy!r}")


def weight_args(qw: QWeight, asym_strategy: str = "group") -> dict[str, Any]:
    """The `weights` QuantizationArgs of a layer (what its config group says)."""
    s = qw.scheme
    k = qw.codes.shape[1]
    groups = qw.scale.shape[1]
    g = min(qw.group_size, k)
    args: dict[str, Any] = {"num_bits": s.bits, "type": "int", "symmetric": qw.zero is None, "dynamic": False}
    if qw.zero is not None and asym_strategy == "block":
        args.update(strategy="block", group_size=None, block_structure=[1, k if groups == 1 else g])
    elif groups == 1:
        args.update(strategy="channel", group_size=None)
    else:
        args.update(strategy="group", group_size=g)
    return args


def pack_quantized_tensors(qw: QWeight, name: str, asym_strategy: str = "group") -> dict[str, torch.Tensor]:
    """One layer's tensors in the pack-quantized layout (keys without the module prefix)."""
    s = qw.scheme
    n, k = qw.codes.shape
    if s.grid != "int":
        raise BitsmithError(f"{name}: compressed-tensors pack-quantized holds integer grids, not {s.grid}; "
                            "export NF4/FP8/binary models with bitsmith save or --format gguf")
    if qw.perm is not None:
        raise BitsmithError(f"{name}: act-order (GPTQ act_order) codes are not exported to compressed-tensors yet; "
                            "quantize without act_order")
    if k % min(qw.group_size, k) != 0:
        raise BitsmithError(f"{name}: compressed-tensors needs the group size to divide in_features {k}; "
                            f"re-quantize with a group size that divides {k} or per channel (--group-size -1)")
    out = {"weight_packed": pack_int32(qw.codes, s.bits), "weight_scale": qw.scale.clone(),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if qw.zero is not None:
        z = qw.zero.float()
        if not bool(torch.equal(z, z.round())):
            raise BitsmithError(f"{name}: fractional zero points (HQQ) have no pack-quantized form; "
                                "use method rtn, gptq or awq")
        if asym_strategy == "block":     # the package keeps block zero points unpacked, signed like its codes
            out["weight_zero_point"] = (z - 2 ** (s.bits - 1)).to(torch.int8).contiguous()      # (N, G)
        else:
            out["weight_zero_point"] = pack_int32(z.t().to(torch.uint8), s.bits).t().contiguous()  # (words, G)
    return out


def _layer_qweight(name: str, mod: _Packed, notes: list[str]) -> QWeight:
    if isinstance(mod, Int8MixedLinear):
        notes.append(f"{name}: LLM.int8() layer written as W8A16 (no outlier decomposition)")
        qw = mod.qweight()
        return QWeight(qw.codes, qw.scale, qw.zero, qw.scheme)
    if type(mod) is not QuantLinear:
        what = "AWQ run-time input scale" if "input_scale" in (mod.transform_spec or {}) else type(mod).__name__
        raise BitsmithError(f"{name}: {what} has no compressed-tensors form; re-quantize without it "
                            "(AWQ: a model whose scales fold into the previous layer)")
    if mod.transform_spec:
        raise BitsmithError(f"{name}: double-quantized scales have no compressed-tensors form")
    return mod.qweight()


def write(loaded: LoadedModel, tmp_path: Path, *, asym_strategy: str = "group") -> dict:
    """Write model.safetensors + config.json (with quantization_config) + tokenizer under tmp_path.
    asym_strategy: "group" (the package's own layout, read by vLLM) or "block" (loads in transformers
    with compressed-tensors 0.18-0.20.1; see the module docstring)."""
    validate_options(asym_strategy)
    cfg = hf_config(loaded, "compressed-tensors")
    state, aliases = unquantized_state(loaded.model)
    notes: list[str] = []
    groups: dict[str, dict[str, Any]] = {}
    n_layers = 0
    for name, mod in quantized_linears(loaded.model, "compressed-tensors"):
        qw = _layer_qweight(name, mod, notes)
        state.update({f"{name}.{k}": v for k, v in pack_quantized_tensors(qw, name, asym_strategy).items()})
        args = weight_args(qw, asym_strategy)
        groups.setdefault(json.dumps(args, sort_keys=True),
                          {"targets": [], "weights": args, "input_activations": None, "output_activations": None,
                           "format": FORMAT})["targets"].append(name)
        n_layers += 1
    if asym_strategy == "group" and any(not g["weights"]["symmetric"] for g in groups.values()):
        notes.append("asymmetric layers: transformers with compressed-tensors 0.18-0.20.1 loads them only with "
                     "quantization_config=CompressedTensorsConfig(dequantize=True) (upstream zero-point shape bug); "
                     "--option asym_strategy=block loads by default there, but vLLM does not read it")
    quantized = {n for g in groups.values() for n in g["targets"]}
    ignore = [n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": ignore,
        "kv_cache_scheme": None}
    floats = {t.dtype for k, t in state.items() if t.is_floating_point() and not k.endswith("weight_scale")}
    if len(floats) == 1:                     # the unquantized tensors' dtype is the checkpoint's dtype
        cfg["torch_dtype"] = cfg["dtype"] = str(floats.pop()).removeprefix("torch.")
    write_dir(tmp_path, loaded, state, cfg, "pt")
    return {"format": "compressed-tensors", "layout": FORMAT, "quantized_layers": n_layers,
            "config_groups": len(groups), "ignored": ignore, "tied": aliases, "notes": notes}
