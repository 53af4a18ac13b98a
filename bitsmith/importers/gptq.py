"""Import GPTQ-format Hugging Face checkpoints (as GPTQModel / AutoGPTQ write them) into QWeights.

Per linear the checkpoint holds `qweight` (K * b / 32, N) int32 with 32 / b codes packed along K (code j of
a word at bits j*b), `qzeros` (G, N * b / 32) int32 packed the same way along N, `scales` (G, N) float16
and `g_idx` (K,) the group of every input column (act-order when it is not arange(K) // g). The weight is
W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]); checkpoint_format "gptq" (v1, the default)
stores z - 1, "gptq_v2" stores z. Act-order becomes the QWeight's `perm` (codes describe W[:, perm]),
so codes, zeros and scales are carried over exactly. 2-, 4- and 8-bit packings are supported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import BitsmithError
from ..primitives import QWeight
from ..recipe import Scheme

GPTQ_BITS = (2, 4, 8)


def _unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words with 32 / bits codes each -> the codes, expanded along `dim` (0: rows, 1: columns)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF                                 # unsigned view of the int32 words
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)               # (R, C, per)
    if dim == 0:
        return codes.permute(0, 2, 1).reshape(words.shape[0] * per, words.shape[1])
    return codes.reshape(words.shape[0], words.shape[1] * per)


def gptq_to_qweight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    *, bits: int, group_size: int, sym: bool, v1: bool = True, name: str = "layer") -> QWeight:
    """One GPTQ linear's tensors -> QWeight (N, K) with the checkpoint's codes, zeros and scales."""
    if bits not in GPTQ_BITS:
        raise BitsmithError(f"{name}: GPTQ import supports {GPTQ_BITS}-bit packing, got {bits} bits")
    q = _unpack_words(qweight, bits, 0)                                    # (K, N)
    k, n = q.shape
    g = k if group_size in (-1, None) else group_size
    n_groups = -(-k // g)
    if tuple(scales.shape) != (n_groups, n):
        raise BitsmithError(f"{name}: scales have shape {tuple(scales.shape)}, expected {(n_groups, n)} for "
                            f"K={k}, N={n}, group size {g}")
    z = _unpack_words(qzeros, bits, 1)[:, :n].float() + (1.0 if v1 else 0.0)   # (G, N)
    if g_idx is None:
        g_idx = torch.arange(k) // g
    g_idx = g_idx.to(torch.int64)
    natural = torch.arange(k) // g
    perm = None
    if not torch.equal(g_idx, natural):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], natural):
            raise BitsmithError(f"{name}: g_idx does not split the columns into groups of {g}; cannot import")
    codes = q.t().contiguous()                                             # (N, K)
    if perm is not None:
        codes = codes[:, perm]
    symmetric = sym and bool((z == float(1 << (bits - 1))).all())
    scheme = Scheme(bits=bits, group_size=None if g == k else g, symmetric=symmetric, scale_dtype="float16")
    return QWeight(codes.to(torch.uint8), scales.t().contiguous().to(torch.float16),
                   None if symmetric else z.t().contiguous(), scheme,
                   None if perm is None else perm.to(torch.int32))


def read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BitsmithError(f"{path / 'config.json'} is unreadable: {e}") from e
    qc = cfg.get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() != "gptq":
        raise BitsmithError(f"{path} is not a GPTQ checkpoint (quantization_config.quant_method != gptq)")
    return qc


def load(path: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """A LoadedModel whose GPTQ linears are QuantLinear modules holding the checkpoint's codes."""
    from safetensors.torch import load_file

    from .. import models
    from ..nn import QuantLinear
    from ..select import set_submodule

    d = Path(path)
    qc = read_config(d)
    bits, group_size = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    sym = bool(qc.get("sym", True))
    v1 = str(qc.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise BitsmithError(f"{d} has no .safetensors weights (GPTQ import reads safetensors only, never pickle)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        models.check_safetensors(f)
        state.update(load_file(str(f)))
    model = models.model_from_config(d, dtype=dtype)
    done: list[str] = []
    for prefix in sorted({k[: -len(".qweight")] for k in state if k.endswith(".qweight")}):
        need = [f"{prefix}.{s}" for s in ("qzeros", "scales")]
        missing = [k for k in need if k not in state]
        if missing:
            raise BitsmithError(f"{d}: GPTQ layer {prefix} lacks {', '.join(missing)}")
        qw = gptq_to_qweight(state.pop(f"{prefix}.qweight"), state.pop(f"{prefix}.qzeros"),
                             state.pop(f"{prefix}.scales"), state.pop(f"{prefix}.g_idx", None), bits=bits,
                             group_size=group_size, sym=sym, v1=v1, name=prefix)
        bias = state.pop(f"{prefix}.bias", None)
        try:
            old = model.get_submodule(prefix)
        except AttributeError:
            raise BitsmithError(f"{d}: GPTQ layer {prefix} is not a module of {type(model).__name__}") from None
        if (old.out_features, old.in_features) != qw.shape:
            raise BitsmithError(f"{d}: GPTQ layer {prefix} is {qw.shape}, the model's is "
                                f"{(old.out_features, old.in_features)}")
        set_submodule(model, prefix, QuantLinear.from_qweight(qw, bias, method="gptq"))
        done.append(prefix)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise BitsmithError(f"{d} has tensors the model lacks: {', '.join(unknown[:5])}")
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = sorted(k for k in own if k not in state and not any(k.startswith(p + ".") for p in done)
                     and not (tied and k == "lm_head.weight"))
    if missing:
        raise BitsmithError(f"{d} lacks tensors the model needs: {', '.join(missing[:5])}")
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=False)
    tokenizer = models._tokenizer(str(d), local_only=True)
    arch = (json.loads((d / "config.json").read_text(encoding="utf-8")).get("architectures") or [""])[0]
    kind = "causal-lm" if arch.endswith("ForCausalLM") else "encoder"
    return models.LoadedModel(model=model.eval(), tokenizer=tokenizer, name=d.resolve().name, kind=kind,
                              source_dir=d)
