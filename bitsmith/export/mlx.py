"""MLX export: a directory mlx-lm loads (`mlx_lm.load`), with bitsmith's codes carried over bit-exactly.

mlx-lm's quantized linear `name` is `name.weight` uint32 (N, K*bits/32), `name.scales` and `name.biases`
(N, K/group), dequantized as w = scale * q + bias with unsigned codes q packed LSB-first into
little-endian 32-bit words: bitsmith's `pack` of each row, viewed as uint32. bitsmith's
w = scale * (q - zero) is the same affine map with bias = -scale * zero (exact in float32; rounded once
when written as float16). MLX groups are 32, 64 or 128 columns; a bitsmith group that is a multiple of
one (or per-channel scales) is written as several MLX groups sharing its scale and bias, which is exact.
config.json carries `quantization` {group_size, bits} (per-layer entries where layers differ).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import BitsmithError
from ..models import LoadedModel
from ..nn import Int8MixedLinear
from ..numerics import float_dtype
from ..packing import pack
from ..primitives import QWeight, symmetric_zero
from .hf_dir import hf_config, quantized_linears, unquantized_state, write_dir

OUTPUT_IS_DIR = True
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUPS = (128, 64, 32)


def mlx_group_size(k: int, g: int, name: str = "weight") -> int:
    """The largest MLX group size that divides both the bitsmith group g (k when per-channel) and k."""
    for m in MLX_GROUPS:
        if g % m == 0 and k % m == 0:
            return m
    raise BitsmithError(f"{name}: MLX groups are 32, 64 or 128 columns and must divide in_features {k}; group size "
                        f"{g} has no such divisor; re-quantize with --group-size 32, 64 or 128")


def mlx_tensors(qw: QWeight, dtype: torch.dtype = torch.float16, name: str = "weight") -> dict[str, Any]:
    """QWeight (int grid) -> {"weight" uint32 (N, K*bits/32), "scales", "biases" (N, K/gm), "group_size"}."""
    s = qw.scheme
    k = qw.codes.shape[1]
    if s.grid != "int" or s.bits not in MLX_BITS:
        raise BitsmithError(f"{name}: MLX quantizes {', '.join(map(str, MLX_BITS))}-bit integer weights, got "
                            f"{s.label()}")
    if qw.perm is not None or qw.transform:
        raise BitsmithError(f"{name}: act-order or transformed codes (GPTQ act_order, AWQ input scales, "
                            "incoherence) have no MLX form; re-quantize without them")
    if sys.byteorder != "little":  # pragma: no cover
        raise BitsmithError("MLX export needs a little-endian machine")
    g = min(qw.group_size, k)
    gm = mlx_group_size(k, g, name)
    if (k * s.bits) % 32:
        raise BitsmithError(f"{name}: in_features {k} x {s.bits} bits is not a whole number of 32-bit words")
    cols = torch.arange(k // gm) * gm // g                                  # bitsmith group of each MLX group
    scale = qw.scale.float()[:, cols]                                       # (N, K/gm)
    zero = (torch.full_like(scale, symmetric_zero(s)) if qw.zero is None else qw.zero.float()[:, cols])
    return {"weight": pack(qw.codes, s.bits).contiguous().view(torch.uint32),      # (N, K*bits/32)
            "scales": scale.to(dtype), "biases": (-scale * zero).to(dtype), "group_size": gm, "bits": s.bits}


def legacy_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 keeps rope_theta (and any scaling) inside `rope_parameters`; mlx-lm's model args
    read the top-level `rope_theta` / `rope_scaling` and would silently fall back to theta 10000."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        return {}
    out: dict[str, Any] = {"rope_theta": rp["rope_theta"]}
    if rp.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return out


def write(loaded: LoadedModel, tmp_path: Path, *, dtype: str = "float16") -> dict:
    """Write model.safetensors + config.json (with `quantization`) + tokenizer under tmp_path. dtype: the
    float type of scales, biases and unquantized tensors (float16 as mlx-lm's own conversions; float32
    keeps bias = -scale * zero exact)."""
    cfg = hf_config(loaded, "MLX")
    try:
        tdtype = float_dtype(dtype)
    except Exception as err:
        raise BitsmithError(f"option dtype must be float16, bfloat16 or float32, got {dtype!r}") from err
    state, aliases = unquantized_state(loaded.model)
    state = {k: (t.to(tdtype) if t.is_floating_point() else t) for k, t in state.items()}
    notes: list[str] = []
    per_layer: dict[str, dict[str, int]] = {}
    for name, mod in quantized_linears(loaded.model, "MLX"):
        qw = mod.qweight()
        if isinstance(mod, Int8MixedLinear):
            notes.append(f"{name}: LLM.int8() layer written weight-only (no outlier decomposition)")
            qw = QWeight(qw.codes, qw.scale, qw.zero, qw.scheme)
        t = mlx_tensors(qw, tdtype, name)
        state.update({f"{name}.weight": t["weight"], f"{name}.scales": t["scales"], f"{name}.biases": t["biases"]})
        per_layer[name] = {"group_size": t["group_size"], "bits": t["bits"]}
    counts: dict[tuple[int, int], int] = {}
    for v in per_layer.values():
        counts[(v["group_size"], v["bits"])] = counts.get((v["group_size"], v["bits"]), 0) + 1
    gs, bits = max(counts, key=counts.get)                                  # the most common setting
    default = {"group_size": gs, "bits": bits}
    cfg["quantization"] = {**default, **{n: v for n, v in per_layer.items() if v != default}}  # per-layer overrides
    cfg.update(legacy_rope(cfg))
    write_dir(tmp_path, loaded, state, cfg, "mlx")
    return {"format": "mlx", "quantization": default, "quantized_layers": len(per_layer),
            "overrides": len(cfg["quantization"]) - 2, "dtype": dtype, "tied": aliases, "notes": notes}
