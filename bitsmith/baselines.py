"""External baselines for `bitsmith compare --baselines`: other packages' quantizers on the same model and
the same evaluation tokens, so their rows sit in the same table as bitsmith's.

- quanto    optimum-quanto `quantize(weights=qintB)` + `freeze` (its own group size: <= 128 dividing K)
- hqq       the `hqq` package's HQQLinear (BaseQuantizeConfig(nbits, group_size)), its PyTorch backend
- torchao   `quantize_(IntxWeightOnlyConfig(intB, PerGroup(g)))`, asymmetric; on CPU it keeps one int8 per code
- llamacpp  llama.cpp quant types (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K) made by `llama_model_quantize`
            from the model's GGUF file and evaluated through llama-cpp-python on the same token ids

Every baseline leaves the head (lm_head) unquantized and, like bitsmith, rounds the tensors it leaves in
floating point to float16 first, so differences come from the quantizers. Sizes count what each package
keeps for its quantized layers (packed codes, scales, zeros, as stored) plus 2 bytes per remaining
weight; llama.cpp's size is its GGUF file (it quantizes the embedding too). A package that is not
installed is skipped with a note. Install them with `pip install 'bitsmith[baselines]'` (quanto, hqq, torchao)
and `pip install 'bitsmith[llamacpp]'` (llama-cpp-python has no CPU wheel on PyPI: it compiles llama.cpp).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BitsmithError

log = logging.getLogger(__name__)

# name -> (importable module, pip package, bits it can do)
BASELINES: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "quanto": ("optimum.quanto", "optimum-quanto", (8, 4, 2)),
    "hqq": ("hqq", "hqq", (8, 4, 3, 2, 1)),
    "torchao": ("torchao", "torchao", (8, 7, 6, 5, 4, 3, 2, 1)),
    "llamacpp": ("llama_cpp", "llama-cpp-python", (8, 6, 5, 4, 3, 2)),
}
LLAMA_TYPES = {8: "Q8_0", 6: "Q6_K", 5: "Q5_K_M", 4: "Q4_K_M", 3: "Q3_K_M", 2: "Q2_K"}
HEAD = "lm_head"


def available(name: str) -> bool:
    module = BASELINES[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a missing parent package (optimum) raises instead of returning None
        return False


def plan(names: list[str], bits: list[int], group_size: int | None) -> tuple[list, list[str]]:
    """compare.Config rows for each installed baseline at each bits it supports, and notes for the rest."""
    from .compare import Config

    configs, notes = [], []
    for name in (n.strip() for n in names if n.strip()):
        if name not in BASELINES:
            raise BitsmithError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
        module, pip_name, supported = BASELINES[name]
        if not available(name):
            extra = "llamacpp" if name == "llamacpp" else "baselines"
            notes.append(f"skipped baseline {name}: not installed (pip install '{pip_name}' or 'bitsmith[{extra}]')")
            continue
        if name == "llamacpp":
            configs.append(Config(label="llama.cpp F16", source=name, params={"type": "F16", "bits": 16}))
        for b in bits:
            if b not in supported:
                notes.append(f"skipped baseline {name} at {b} bits: it supports {', '.join(map(str, supported))}")
                continue
            g = None if b == 8 else group_size
            if name == "llamacpp":
                params = {"type": LLAMA_TYPES[b], "bits": b, "group_size": "k-quant" if "K" in LLAMA_TYPES[b] else 32}
                label = f"llama.cpp {LLAMA_TYPES[b]}"
            elif name == "quanto":
                params, label = {"bits": b, "group_size": "<=128"}, f"quanto int{b}"
            else:
                params = {"bits": b, "group_size": g}
                label = f"{name} (package) int{b}-{'pc' if g is None else f'g{g}'}"
            configs.append(Config(label=label, source=name, params=params))
    return configs, notes


def build(cfg: Any, lm: Any, spec: str) -> tuple[Any, dict]:
    """(a model or logits callable, {quantize_seconds, size_bytes, bits_per_weight, ...}) for a baseline of
    the model loaded from `spec`."""
    if lm.kind != "causal-lm":
        raise BitsmithError(f"baseline {cfg.source} is only wired for causal language models")
    n_weights = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
    t0 = time.perf_counter()
    if cfg.source == "llamacpp":
        runner = LlamaCppModel(quantize_gguf(gguf_source(spec), cfg.params["type"]))
        size = os.path.getsize(runner.path)
        return runner, {"quantize_seconds": round(time.perf_counter() - t0, 2), "size_bytes": size, "file_bytes": size,
                        "bits_per_weight": 8 * size / n_weights, "note": "embedding quantized by llama.cpp too"}
    model = _fp16_rounded_copy(lm.model)
    quantized = {"quanto": _quanto, "hqq": _hqq, "torchao": _torchao}[cfg.source](model, cfg.params)
    seconds = time.perf_counter() - t0
    size = stored_bytes(model, quantized)
    return model, {"quantize_seconds": round(seconds, 2), "size_bytes": size, "bits_per_weight": 8 * size / n_weights}


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] != HEAD]


def _fp16_rounded_copy(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.is_floating_point():
                p.copy_(p.half().float())
    return m


def _quanto(model: nn.Module, params: dict) -> set[str]:
    from optimum import quanto

    qtype = {8: quanto.qint8, 4: quanto.qint4, 2: quanto.qint2}[params["bits"]]
    targets = _targets(model)
    quanto.quantize(model, weights=qtype, include=targets)
    quanto.freeze(model)
    return set(targets)


def _hqq(model: nn.Module, params: dict) -> set[str]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    targets = _targets(model)
    cfg = BaseQuantizeConfig(nbits=params["bits"], group_size=params["group_size"] or 64)
    for name in targets:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, HQQLinear(getattr(holder, child), quant_config=cfg, compute_dtype=torch.float32,
                                         device=str(_device(model))))
    return set(targets)


def _torchao(model: nn.Module, params: dict) -> set[str]:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    g = params["group_size"]
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{params['bits']}"),
                                  granularity=PerAxis(0) if g is None else PerGroup(g),
                                  mapping_type=MappingType.ASYMMETRIC)
    targets = set(_targets(model))
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in targets)
    return targets


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def stored_bytes(model: nn.Module, quantized: set[str]) -> int:
    """Bytes of the model as its package stores it: tensors of quantized modules as they are (tensor
    subclasses flattened into their inner tensors), every other floating tensor at 2 bytes; shared
    tensors (a tied embedding) once."""
    total, seen = 0, set()
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        for inner in _inner_tensors(t):
            ident = (inner.data_ptr(), inner.numel(), inner.dtype)
            if inner.numel() == 0 or ident in seen:
                continue
            seen.add(ident)
            if owner in quantized or not inner.is_floating_point():
                total += inner.numel() * inner.element_size()
            else:
                total += 2 * inner.numel()
    return total


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind a tensor subclass (quanto, torchao), recursively; [t] for a plain one."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names if isinstance(getattr(t, n, None), torch.Tensor) for x in _inner_tensors(getattr(t, n))]


# ---- llama.cpp ---------------------------------------------------------------------------------------
def gguf_source(spec: str) -> Path:
    """The GGUF file a model was loaded from: llama.cpp quantizes from it (re-quantizing an already
    quantized file goes through its float values, which are exactly what bitsmith's reference computes)."""
    from .models import BUNDLED, bundled_path

    path = bundled_path(spec) if spec in BUNDLED else Path(spec).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        path = ggufs[0] if len(ggufs) == 1 else path
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise BitsmithError(f"the llama.cpp baseline needs the model as a .gguf file; {spec} is not one "
                            "(convert it with llama.cpp's convert_hf_to_gguf.py and pass the file)")
    return path


class LlamaCppModel:
    """A llama.cpp model behind the logits-callable interface of evaluate.score_windows: ids (1, L) ->
    logits (1, L, V), plus its own latency measurement (llama.cpp's own threads and KV cache)."""

    def __init__(self, path: Path, n_ctx: int = 2048) -> None:
        import llama_cpp

        self.path = path
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False,
                                   n_threads=torch.get_num_threads())

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = ids.reshape(-1).tolist()
        if len(tokens) > self.llm.n_ctx():
            raise BitsmithError(f"llama.cpp context {self.llm.n_ctx()} is shorter than {len(tokens)} tokens")
        self.llm.reset()
        self.llm.eval(tokens)
        scores = torch.from_numpy(self.llm.scores[: len(tokens)].copy())  # (L, V)
        return scores.unsqueeze(0)

    def latency(self, prompt: torch.Tensor, new_tokens: int = 16) -> dict:
        tokens = prompt.reshape(-1).tolist()
        best_p = best_d = float("inf")
        for _ in range(2):
            self.llm.reset()
            t0 = time.perf_counter()
            self.llm.eval(tokens)
            best_p = min(best_p, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                nxt = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
                self.llm.eval([nxt])
            best_d = min(best_d, time.perf_counter() - t0)
        return {"prefill_tokens_per_s": len(tokens) / best_p, "decode_tokens_per_s": new_tokens / best_d,
                "prefill_tokens": len(tokens), "decode_tokens": new_tokens, "kv_cache": True}


def quantize_gguf(src: Path, qtype: str) -> Path:
    """src re-quantized to a llama.cpp type (cached beside bitsmith's other conversions, written atomically)."""
    import llama_cpp

    from .models import cache_dir

    st = src.stat()
    dst = cache_dir() / "llamacpp" / f"{src.stem}-{st.st_size}-{st.st_mtime_ns}-{qtype}.gguf"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise BitsmithError(f"this llama-cpp-python has no quant type {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise BitsmithError(f"llama.cpp could not quantize {src} to {qtype} (return code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
