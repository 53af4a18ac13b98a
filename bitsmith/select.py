"""Which modules a recipe quantizes: glob or regex targets minus ignores, and explicit module swapping.

Patterns are globs (`*.mlp.*`) or regular expressions written `re:...` (searched in the qualified name).
A glob without a dot also matches a module's last name component, so `lm_head` ignores `model.lm_head`.
Linear and Conv2d layers are candidates by default; embeddings only when a target names them explicitly,
and output heads that share their weight with an embedding are kept unless a target names them.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from .errors import BitsmithError
from .recipe import DEFAULT_IGNORE

QUANTIZABLE = (nn.Linear, nn.Conv2d)


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if fnmatch.fnmatchcase(name, pattern):
        return True
    return "." not in pattern and fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def _explicit(name: str, targets: tuple[str, ...]) -> bool:
    """Named by a target other than the catch-all '*'."""
    return any(p not in ("*", "re:.*") and matches(name, p) for p in targets)


def select_modules(model: nn.Module, targets: tuple[str, ...], ignore: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    for p in (*targets, *ignore):
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise BitsmithError(f"invalid regular expression in pattern {p!r}: {e}") from e
    tied = _tied_heads(model)
    chosen, used = [], set()
    for name, mod in model.named_modules():
        if not name:
            continue
        hit = [p for p in targets if matches(name, p)]
        if not hit:
            continue
        explicit = _explicit(name, targets)
        is_candidate = isinstance(mod, QUANTIZABLE) or (isinstance(mod, nn.Embedding) and explicit)
        if not is_candidate or (name in tied and not explicit):
            continue
        used.update(hit)
        ignored_by = [p for p in ignore if matches(name, p)]
        # The default ignores (lm_head) yield to a target that names the module; a user's ignore never does.
        if ignored_by and not (explicit and all(p in DEFAULT_IGNORE for p in ignored_by)):
            continue
        chosen.append((name, mod))
    unused = [p for p in targets if p not in used and p not in ("*", "re:.*")]
    if unused:
        raise BitsmithError(f"target pattern(s) {', '.join(map(repr, unused))} matched no Linear/Conv2d/Embedding "
                            "module; check the names with `bitsmith inspect` or print(model)")
    return chosen


def _tied_heads(model: nn.Module) -> set[str]:
    """Linear layers whose weight is an embedding's weight (tied output heads)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in emb}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at dotted `name` (explicit swapping, never monkey patching)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
