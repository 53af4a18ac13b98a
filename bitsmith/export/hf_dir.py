"""What the Hugging Face-style exports (compressed-tensors, MLX) share: the unquantized tensors of a model,
its quantized linears, and writing safetensors + config.json + tokenizer into the export directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import payload_keys, storage_state
from ..errors import BitsmithError
from ..models import LoadedModel
from ..nn import QuantLinear, _Packed

WEIGHTS = "model.safetensors"


def hf_config(loaded: LoadedModel, fmt: str) -> dict[str, Any]:
    """The model's config as a dict (tie_word_embeddings off when the head itself is quantized)."""
    config = getattr(loaded.model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise BitsmithError(f"{fmt} export needs a Hugging Face model (with a config); got {type(loaded.model).__name__}")
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    head = loaded.model.get_output_embeddings() if hasattr(loaded.model, "get_output_embeddings") else None
    if isinstance(head, _Packed):            # a quantized head is no longer tied to the embedding
        cfg["tie_word_embeddings"] = False
    return cfg


def unquantized_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, tied aliases) of everything but the bitsmith payload, tied tensors once, at keep_dtype."""
    state, aliases = storage_state(model)
    for key in payload_keys(model):
        state.pop(key, None)
    return state, aliases


def quantized_linears(model: torch.nn.Module, fmt: str) -> Iterator[tuple[str, QuantLinear]]:
    """(name, module) of every bitsmith module, all of which must be linears; raises when there is none."""
    found = False
    for name, mod in model.named_modules():
        if not isinstance(mod, _Packed):
            continue
        if not isinstance(mod, QuantLinear):
            raise BitsmithError(f"{name}: only quantized linears have a {fmt} form here ({mod.kind} does not); "
                                f"keep it unquantized (--ignore {name})")
        found = True
        yield name, mod
    if not found:
        raise BitsmithError("the model has no bitsmith-quantized layers; quantize it first (bitsmith quantize)")


def write_dir(tmp_path: Path, loaded: LoadedModel, state: dict[str, torch.Tensor], cfg: dict[str, Any],
              producer_format: str) -> None:
    """model.safetensors, config.json, the tokenizer and the generation config under tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp_path / WEIGHTS), metadata={"format": producer_format, "producer": "bitsmith"})
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
    if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(str(tmp_path))
    gen = getattr(loaded.model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(str(tmp_path))
