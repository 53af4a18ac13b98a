"""Replay of finished sub-modules during a true-sequential block walk: the same numbers, fewer forward passes.

A true-sequential method (GPTQ) runs a block once per layer group (q/k/v, then o, then gate/up, then down)
and once more to propagate its quantized outputs, and each pass recomputes everything before the group it
observes: attention is computed four times and gate/up twice. Many sub-modules end with a target layer: a
Llama attention returns o_proj's output, its MLP down_proj's. When such a layer L is observed, its input X_L
is seen anyway; once L and every other target inside its parent module M are quantized, M's output on that
batch is exactly L_q(X_L), so later passes can take it instead of running M.

`Plan` finds such (M, L) pairs by tracing one batch (M's output *is* L's output tensor, and M returns nothing
else that is a tensor), stores X_L per batch while L's group is observed, then swaps M for a `Replay` module
(explicit module swapping; the original is put back by `close`). A batch is recognised by a fingerprint of
M's inputs (sums of every tensor argument), so a replay never answers for inputs it did not see: on any
mismatch the original module runs. Only for methods that do not rewrite the float block (AWQ's folds change
M's inputs) and only where a pass stops right after its last target (otherwise X_L could be modified later).
Memory: X_L and then M's output per calibration batch (for SmolLM2 at 128 x 512 tokens about 0.7 GB in
float32), so the engine enables it on the CPU by default, where it saves the most time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Pair:
    """Module `module` (name in the block) returns target `layer`'s output; `template` is its output
    structure on the trace batch (the tensor to replace is the first one)."""

    module: str
    layer: str
    template: Any
    inside: list[str]                                   # every target under `module`
    cache: dict[tuple, list] = field(default_factory=dict)   # fingerprint -> [X_L or None, output or None]


def fingerprint(args: tuple, kwargs: dict) -> tuple:
    """Shapes and float64 sums of every tensor argument (nested in tuples, lists and dicts), in order."""
    out: list = []

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            out.append((tuple(v.shape), float(v.sum(dtype=torch.float64)) if v.numel() else 0.0))
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for k in sorted(v):
                out.append(k)
                visit(v[k])
        elif v is None or isinstance(v, (bool, int, float, str)):
            out.append(v)

    visit(args)
    visit(kwargs)
    return tuple(out)


def _first_tensor(out: Any) -> tuple[torch.Tensor | None, bool]:
    """(first tensor of a module output, whether it is the only tensor in it)."""
    if isinstance(out, torch.Tensor):
        return out, True
    if isinstance(out, tuple) and not hasattr(out, "_fields") and out and isinstance(out[0], torch.Tensor):
        return out[0], not any(isinstance(x, torch.Tensor) for x in out[1:])
    return None, False


def _rebuild(template: Any, t: torch.Tensor) -> Any:
    return t if template is None else (t, *template[1:])


class Replay(nn.Module):
    """Stands in for a finished module: returns L_q(X_L) for the batches it has seen, else runs the original."""

    def __init__(self, original: nn.Module, layer: nn.Module, pair: Pair) -> None:
        super().__init__()
        self._held = (original, layer)          # a tuple, not submodules: parameters are not registered twice
        self.pair = pair
        self.hits = 0
        self.misses = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        original, layer = self._held
        entry = self.pair.cache.get(fingerprint(args, kwargs))
        if entry is None:
            self.misses += 1
            return original(*args, **kwargs)
        if entry[1] is None:
            entry[1], entry[0] = layer(entry[0]), None
        self.hits += 1
        # a copy: the caller may add to it in place, and the next pass needs it unchanged
        return _rebuild(self.pair.template, entry[1].clone())


class Plan:
    """Replay pairs of one block; `capture(phase)` around a phase's observation, `activate(phase)` after its
    layers are quantized, `close()` when the block is done (also on errors)."""

    def __init__(self, block: nn.Module, targets: dict[str, nn.Module], batch: tuple[tuple, dict],
                 run_block: Callable[[nn.Module, tuple], Any]) -> None:
        self.block = block
        self.pairs = find_pairs(block, targets, batch, run_block)
        self.done: set[str] = set()              # quantized targets
        self.swapped: list[tuple[str, nn.Module, Replay]] = []

    def capture(self, phase_names: list[str]) -> "_Capture":
        """Hooks storing X_L (keyed by M's input fingerprint) for pairs whose L is in this phase and whose
        other targets under M are quantized by the end of it."""
        ready = set(self.done) | set(phase_names)
        live = [p for p in self.pairs if p.layer in phase_names and set(p.inside) <= ready]
        return _Capture(self.block, live)

    def activate(self, phase_names: list[str]) -> None:
        from .select import set_submodule

        self.done |= set(phase_names)
        for p in self.pairs:
            if p.cache and set(p.inside) <= self.done and not any(s[0] == p.module for s in self.swapped):
                original = self.block.get_submodule(p.module)
                rep = Replay(original, self.block.get_submodule(p.layer), p)
                set_submodule(self.block, p.module, rep)
                self.swapped.append((p.module, original, rep))

    def close(self) -> None:
        from .select import set_submodule

        for name, original, rep in reversed(self.swapped):
            set_submodule(self.block, name, original)
            log.debug("replay %s: %d hits, %d misses", name, rep.hits, rep.misses)
        self.swapped.clear()
        for p in self.pairs:
            p.cache.clear()

    def stats(self) -> dict[str, tuple[int, int]]:
        return {name: (rep.hits, rep.misses) for name, _, rep in self.swapped}


class _Capture:
    def __init__(self, block: nn.Module, pairs: list[Pair]) -> None:
        self.block, self.pairs, self.handles = block, pairs, []

    def __enter__(self) -> "_Capture":
        for p in self.pairs:
            key: list = [None]

            def pre_m(mod, args, kwargs, key=key):
                key[0] = fingerprint(args, kwargs)

            def pre_l(mod, args, key=key, p=p):
                if key[0] is not None and args and isinstance(args[0], torch.Tensor):
                    p.cache[key[0]] = [args[0], None]
                key[0] = None

            self.handles.append(self.block.get_submodule(p.module).register_forward_pre_hook(pre_m, with_kwargs=True))
            self.handles.append(self.block.get_submodule(p.layer).register_forward_pre_hook(pre_l))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def find_pairs(block: nn.Module, targets: dict[str, nn.Module], batch: tuple[tuple, dict],
               run_block: Callable[[nn.Module, tuple], Any]) -> list[Pair]:
    """Trace one batch: the outermost sub-module returning a target's output tensor (and no other tensor)."""
    outs: dict[str, Any] = {}
    handles = []
    for name, mod in block.named_modules():
        if name:
            handles.append(mod.register_forward_hook(_keep(name, outs)))
    try:
        with torch.no_grad():
            run_block(block, batch)
    finally:
        for h in handles:
            h.remove()
    pairs: list[Pair] = []
    for lname in targets:
        lt, _ = _first_tensor(outs.get(lname))
        if lt is None:
            continue
        parents = [n for n in outs if n != lname and lname.startswith(n + ".") and n not in targets]
        for mname in sorted(parents, key=len):                    # outermost first
            t, alone = _first_tensor(outs[mname])
            if t is lt and alone:
                inside = [n for n in targets if n.startswith(mname + ".")]
                pairs.append(Pair(mname, lname, _template(outs[mname]), inside))
                break
    return pairs


def _keep(name: str, outs: dict) -> Callable:
    def hook(mod, args, out):
        outs.setdefault(name, out)              # the first call: a module called twice keeps its first output
    return hook


def _template(out: Any) -> Any:
    return None if isinstance(out, torch.Tensor) else tuple(None if isinstance(x, torch.Tensor) else x for x in out)
