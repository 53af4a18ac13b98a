"""One progress-bar wrapper for every long loop: tqdm when it is installed (the `cli` extra) and wanted,
the plain iterable otherwise, so library calls never need tqdm."""

from __future__ import annotations

from collections.abc import Iterable


def bar(items: Iterable, enabled: bool, desc: str, unit: str, *, leave: bool = False, **tqdm_args) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, leave=leave, **tqdm_args)
