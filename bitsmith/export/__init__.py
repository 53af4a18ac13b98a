"""Export a loaded (quantized) model to a runtime's file format: GGUF, ONNX, compressed-tensors, MLX.

One registry, one entry point. Each format lives in its own module (imported lazily, so `import bitsmith`
never pulls in gguf or onnx) that declares `OUTPUT_IS_DIR` and `write(loaded, tmp_path, **options) -> dict`.
`export` checks the output first, lets the format write to a temporary path beside it, and renames that
into place, so a failed or interrupted export never leaves a half-written file, and an existing output is
only replaced with `overwrite=True`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import BitsmithError

FORMATS = {"gguf": "bitsmith.export.gguf", "onnx": "bitsmith.export.onnx",
           "compressed-tensors": "bitsmith.export.compressed_tensors", "mlx": "bitsmith.export.mlx"}
# The pip extra that provides each format's third-party packages.
EXTRAS = {"gguf": "hf", "onnx": "onnx", "compressed-tensors": "hf", "mlx": "mlx"}


def require(package: str, fmt: str) -> ModuleType:
    """Import `package` for format `fmt`, or raise a one-line error naming the pip extra to install."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise BitsmithError(f"exporting to {fmt} needs {package}: pip install 'bitsmith[{EXTRAS.get(fmt, fmt)}]'"
                            ) from e


def format_module(fmt: str) -> ModuleType:
    """The module implementing `fmt` (imported now), with a clear error for unknown or missing formats."""
    if fmt not in FORMATS:
        raise BitsmithError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[fmt])
    except ModuleNotFoundError as e:
        if e.name == FORMATS[fmt]:
            raise BitsmithError(f"export format {fmt} is not available in this version of bitsmith") from e
        raise BitsmithError(f"exporting to {fmt} needs {e.name}: pip install 'bitsmith[{EXTRAS[fmt]}]'") from e


def check_options(mod: ModuleType, fmt: str, options: dict[str, Any]) -> None:
    """Reject options the format's `write` does not take, naming the ones it does (and, where the format
    has a `validate_options`, values it cannot use)."""
    params = inspect.signature(mod.write).parameters
    known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [] if open_ended else sorted(set(options) - set(known))
    if unknown:
        raise BitsmithError(f"format {fmt} has no option(s) {', '.join(unknown)}; "
                            f"its options: {', '.join(known) or 'none'}")
    if hasattr(mod, "validate_options"):       # a format may check option values before any model is loaded
        mod.validate_options(**options)


def check_output(out: Path, overwrite: bool, is_dir: bool) -> None:
    """Fail before any work when `out` cannot be written; never touch an existing output without overwrite."""
    if out.exists() and not overwrite:
        raise BitsmithError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir() != is_dir:
        want = "a directory" if is_dir else "a file"
        raise BitsmithError(f"output {out} exists and is not {want}; choose another --output")
    probe = out.parent if str(out.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise BitsmithError(f"cannot write to {probe}; choose another --output")


def export(loaded: Any, fmt: str, output: str | Path, *, overwrite: bool = False, **options: Any) -> dict:
    """Write `loaded` (a models.LoadedModel) as `fmt` to `output`, atomically; returns the format's summary
    plus `format`, `output` and `bytes`."""
    mod = format_module(fmt)
    check_options(mod, fmt, options)
    out = Path(output)
    is_dir = bool(mod.OUTPUT_IS_DIR)
    check_output(out, overwrite, is_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the output, so the final rename stays on one filesystem and is atomic.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_dir:
        tmp.mkdir()
    try:
        summary = dict(mod.write(loaded, tmp, **options) or {})
        _publish(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    summary.update({"format": fmt, "output": str(out), "bytes": _size(out)})
    return summary


def _publish(tmp: Path, out: Path) -> None:
    if tmp.is_dir():                    # os.replace cannot replace a non-empty directory: swap via a side name
        from ..checkpoint import _replace_dir

        _replace_dir(tmp, out)
    else:
        os.replace(tmp, out)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
