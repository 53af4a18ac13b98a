"""Save and load quantized models: `model.safetensors` (packed buffers as they sit in memory), a JSON
`quantization_config` (also inside the HF `config.json`), the resolved recipe, and the tokenizer.

Never pickle: loading reads tensors only and rebuilds modules from the JSON description. Writes go to a
temporary directory beside the target and are renamed into place, so a crash leaves no half-written output,
and an existing output is only replaced when `overwrite=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .apply import RECIPE_ATTR
from .errors import BitsmithError
from .nn import _Packed, build_empty
from .numerics import float_dtype
from .recipe import Recipe
from .select import set_submodule

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
QCONFIG = "quantization_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "tokenizer.model", "chat_template.jinja", "added_tokens.json",
                   "generation_config.json")


def payload_keys(model: nn.Module) -> set[str]:
    """State-dict keys of quantized payload (codes, scales, zeros, perm): stored exactly as in memory."""
    return {f"{n}.{b}" if n else b for n, m in model.named_modules() if isinstance(m, _Packed)
            for b, _ in m.named_buffers(recurse=False)}


def storage_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a checkpoint stores: tied tensors once (aliases maps the others to it), unquantized
    floating tensors at the recipe's keep_dtype."""
    recipe: Recipe | None = getattr(model, RECIPE_ATTR, None)
    keep = float_dtype(recipe.keep_dtype) if recipe is not None and recipe.keep_dtype else None
    if recipe is not None and recipe.method in ("fp16", "bf16"):
        keep = float_dtype({"fp16": "float16", "bf16": "bfloat16"}[recipe.method])
    payload = payload_keys(model)
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, t in model.state_dict().items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            aliases[k] = seen[ident]
            continue
        seen[ident] = k
        if keep is not None and t.is_floating_point() and k not in payload:
            t = t.to(keep)
        out[k] = t.detach().contiguous().cpu()
    return out, aliases


def quant_config(model: nn.Module, aliases: dict[str, str]) -> dict[str, Any]:
    recipe: Recipe | None = getattr(model, RECIPE_ATTR, None)
    modules = {n: m.quant_info() for n, m in model.named_modules() if isinstance(m, _Packed)}
    return {"quant_method": "bitsmith", "format_version": FORMAT_VERSION,
            "recipe": recipe.to_dict() if recipe else None, "modules": modules, "tied": aliases}


def save(model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None, source_dir: str | Path | None = None,
         overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write the model to `out_dir` atomically; returns the path."""
    out = Path(out_dir)
    check_output(out, overwrite)
    state, aliases = storage_state(model)
    qconfig = quant_config(model, aliases)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "bitsmith"})
        _write_json(tmp / QCONFIG, qconfig)
        hf_config = getattr(model, "config", None)
        if hf_config is not None and hasattr(hf_config, "to_dict"):
            cfg = hf_config.to_dict()
            cfg["quantization_config"] = qconfig
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if isinstance(head, _Packed):       # a quantized head is no longer tied to the embedding
                cfg["tie_word_embeddings"] = False
            _write_json(tmp / "config.json", cfg)
        _copy_tokenizer(tmp, tokenizer, source_dir)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work if `out` cannot be written; never touch an existing output without overwrite."""
    if out.exists() and not overwrite:
        raise BitsmithError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise BitsmithError(f"output {out} exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise BitsmithError(f"cannot write to {probe}; choose another --output")


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def _copy_tokenizer(dest: Path, tokenizer: Any, source_dir: str | Path | None) -> None:
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(dest))
        return
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copy2(src, dest / name)


# ---- load --------------------------------------------------------------------------------------------
def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QCONFIG).is_file()


def read_qconfig(path: str | Path) -> dict[str, Any]:
    p = Path(path) / QCONFIG
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BitsmithError(f"{p} is not a readable bitsmith quantization config: {e}") from e
    if cfg.get("quant_method") != "bitsmith" or "modules" not in cfg:
        raise BitsmithError(f"{p} is not a bitsmith quantization config")
    return cfg


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BitsmithError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BitsmithError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from e


def load(path: str | Path, model: nn.Module | None = None, *, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model saved by `save`. Hugging Face models are rebuilt from `config.json`;
    any other `nn.Module` needs its unquantized skeleton passed as `model`."""
    d = Path(path)
    if not d.exists():
        raise BitsmithError(f"checkpoint directory {d} does not exist")
    if not is_checkpoint(d):
        raise BitsmithError(f"{d} is not a bitsmith checkpoint (no {QCONFIG}); quantize a model first")
    qcfg = read_qconfig(d)
    state = read_state(d / WEIGHTS)
    if model is None:
        from .models import model_from_config

        model = model_from_config(d, dtype=dtype)
    for name, info in qcfg["modules"].items():
        set_submodule(model, name, build_empty(info, dtype))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise BitsmithError(f"checkpoint {d} has tensors the model lacks: {', '.join(unexpected[:5])}")
    payload = payload_keys(model)
    for k, t in state.items():
        if t.is_floating_point() and own[k].is_floating_point() and k not in payload:
            state[k] = t.to(own[k].dtype)
    missing = set(own) - set(state)
    _tie(model, {k: v for k, v in qcfg.get("tied", {}).items() if k in missing})
    still = sorted(missing - set(qcfg.get("tied", {})))
    if still:
        raise BitsmithError(f"checkpoint {d} lacks tensors the model needs: {', '.join(still[:5])}")
    model.load_state_dict(state, strict=False)
    if qcfg.get("recipe"):
        setattr(model, RECIPE_ATTR, Recipe.from_dict(qcfg["recipe"]))
    return model.to(device).eval()


def _tie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias share its source tensor, as it did when saved (tied embeddings)."""
    for alias, src in aliases.items():
        mod_name, _, attr = alias.rpartition(".")
        src_mod, _, src_attr = src.rpartition(".")
        target = getattr(model.get_submodule(src_mod), src_attr)
        setattr(model.get_submodule(mod_name), attr, target)
