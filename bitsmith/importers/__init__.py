"""Read other tools' quantized files into bitsmith QWeights without a float round trip: GGUF (llama.cpp)
and GPTQ-format Hugging Face checkpoints (GPTQModel / AutoGPTQ). `load_for_export` picks the importer
a path needs and falls back to models.load_any for everything else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def gguf_path(spec: str) -> Path | None:
    """The .gguf file `spec` names (a bundled GGUF model, a .gguf file, or a directory holding one), or None."""
    from ..models import BUNDLED, bundled_path

    if spec in BUNDLED:
        p = bundled_path(spec)
        return p if p.is_file() and p.suffix.lower() == ".gguf" else None
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def is_gptq_dir(spec: str) -> bool:
    p = Path(spec).expanduser() / "config.json"
    if not p.is_file():
        return False
    try:
        qc = json.loads(p.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return str(qc.get("quant_method", "")).lower() == "gptq"


def load_for_export(spec: str) -> Any:
    """A LoadedModel that keeps quantized codes as they are where the source has them."""
    g = gguf_path(spec)
    if g is not None:
        from .gguf import load

        return load(g)
    if is_gptq_dir(spec):
        from .gptq import load as load_gptq

        return load_gptq(spec)
    from ..models import load_any

    return load_any(spec)
