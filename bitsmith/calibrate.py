"""The sequential calibration engine, after GPTQ's "Catcher" walk (Frantar et al. 2022, IST-DASLab/gptq).

1. A forward pre-hook on decoder block 0 records the inputs of each calibration batch (positional and
   keyword: attention mask, position ids / embeddings, cache flags) and stops the forward there.
2. Block by block, on the compute device: layers that read the same tensor form a group (q/k/v, gate/up),
   found by tracing one batch; hooks feed each group's input to the method's observers (observers.py);
   the method quantizes the layers, which are swapped for packed modules; the block is rerun and its
   *quantized* outputs become the next block's inputs. SEQUENTIAL methods (GPTQ) observe and quantize
   the groups in call order, each group seeing the earlier ones quantized ("true sequential"); a method
   may also rescale the float block first (`transform_block`, AWQ). No per-architecture driver.
3. Models without a block list (encoders without one, CNNs) and layers outside it take the same path with
   the whole model as the one "block".
A calibrated method is a module with NEEDS, `quantize(weight, stats, scheme, *, name, info, **args)`
(`info` receives report entries such as the damping used) and optionally SEQUENTIAL and transform_block.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import methods, replay
from .apply import layer_report, make_quant_module, weight_2d
from .errors import BitsmithError
from .progress import bar as progress_bar
from .nn import LINEAR_CLASSES
from .observers import features, in_features, make_observers, observable
from .primitives import dequantize_weight, quantize_weight
from .recipe import Recipe, Scheme
from .select import select_modules, set_submodule

log = logging.getLogger(__name__)

Batch = tuple[tuple, dict]            # (args, kwargs) of one block call; the hidden states are args[0]
ENGINE_ARGS = ("true_sequential", "replay")    # method_args the engine reads itself
# Whether a quantized linear class applies QWeight.transform["input_scale"] at run time (see awq.py).
RUNTIME_INPUT_SCALE = any("input_scale" in c.TRANSFORMS for c in LINEAR_CLASSES)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early; caught by the engine."""


@dataclass
class Group:
    """Target layers (names relative to the block) that read one input tensor, in call order; `source`
    names the norm-like module that produced that tensor, when one did."""

    names: list[str]
    source: str | None = None


# ---- entry point ---------------------------------------------------------------------------------------
def quantize_calibrated(model: nn.Module, recipe: Recipe, *, progress: bool = False, tokenizer: Any = None,
                        calib_text: str | None = None, n_samples: int = 128, seq_len: int = 512,
                        calib_ids: torch.Tensor | None = None, batch_size: int = 8,
                        device: str | torch.device | None = None) -> list[dict]:
    """Quantize `model` in place with a calibrated method; returns one report dict per quantized layer.
    Calibration data: `calib_ids` (n, L) token ids (or any model input batched along dim 0), else
    `n_samples` random windows of `seq_len` tokens of `calib_text` (default: the bundled text)."""
    method = methods.get(recipe.method)
    engine_args, method_args = _split_args(method, recipe.method_args)
    ids = calibration_ids(tokenizer, calib_text, n_samples, seq_len, calib_ids, seed=recipe.seed)
    chosen = dict(select_modules(model, recipe.targets, recipe.ignore))
    if not chosen:
        raise BitsmithError("the recipe selects no module to quantize; check its targets and ignore patterns")
    home = _home_device(model)
    device = torch.device(device) if device is not None else home
    sequential = getattr(method, "SEQUENTIAL", False) and engine_args.get("true_sequential", True)
    # replay.py: exact, saves most of a true-sequential walk's repeated passes; its caches cost memory, and
    # on an accelerator recomputing is cheaper than holding them, so by default only on the CPU
    use_replay = engine_args.get("replay")
    use_replay = (device.type == "cpu") if use_replay is None else bool(use_replay)
    run = _Run(method, recipe.method, recipe.scheme, method_args, sequential,
               use_replay and sequential and not hasattr(method, "transform_block"))
    from .models import find_decoder_blocks  # models.py imports transformers lazily: this stays light

    found = find_decoder_blocks(model)
    report: list[dict] = []
    t0 = time.perf_counter()
    with torch.no_grad(), reference_kernels():
        if found is not None:
            prefix, blocks = found
            # popped, not copied: the walk drops each float layer once it is swapped, so neither host nor
            # GPU memory keeps the replaced float weights (they grew peak GPU memory by one block per block)
            inside = {n: chosen.pop(n) for n in list(chosen) if n.startswith(prefix + ".")}
            if inside:
                report += _walk_blocks(model, prefix, blocks, inside, ids, run, batch_size, device, progress)
        if chosen:   # no block list, or layers outside it (an explicitly targeted lm_head, say)
            log.info("calibrating %d layer(s) with whole-model passes", len(chosen))
            report += _whole_model(model, chosen, ids, run, batch_size, device)
    log.info("%s %s: %d layers in %.1f s", recipe.method, recipe.scheme.label(), len(report),
             time.perf_counter() - t0)
    return report


@contextmanager
def reference_kernels() -> Iterator[None]:
    """Run already-quantized layers through the reference forward (dequantize + F.linear) while calibrating:
    the next layers' statistics then see exactly what the saved model computes, on any device, and no
    inference kernel (built for decode-sized inputs) runs on 128 x 512-token batches."""
    from . import kernels

    saved = kernels._policy            # the explicit policy, None when it follows $BITSMITH_KERNELS
    kernels.set_policy("reference")
    try:
        yield
    finally:
        kernels.set_policy(saved)


def calibration_ids(tokenizer: Any, calib_text: str | None, n_samples: int, seq_len: int,
                    calib_ids: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    if calib_ids is not None:
        if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() < 1 or calib_ids.shape[0] < 1:
            raise BitsmithError("calib_ids must be a tensor with one calibration sample per row, e.g. (n, L)")
        return calib_ids
    if tokenizer is None:
        raise BitsmithError("a calibrated method needs calibration data: pass tokenizer= (and calib_text=) "
                            "or calib_ids= (n, L) token ids")
    from .models import calibration_samples, load_text

    text = calib_text if calib_text is not None else load_text(None)[0]
    return calibration_samples(tokenizer, text, n_samples, seq_len, seed=seed)      # (n, L)


# ---- one quantization run: method, scheme, arguments -----------------------------------------------------
@dataclass
class _Run:
    method: ModuleType
    name: str
    scheme: Scheme
    args: dict
    sequential: bool
    replay: bool = False

    def method_args(self) -> dict:
        """The recipe's arguments over the method's defaults for this scheme (gptq: act-order at 3 bits)."""
        defaults = getattr(self.method, "scheme_defaults", None)
        return {**(defaults(self.scheme) if defaults else {}), **self.args}

    def quantize_groups(self, block: nn.Module, groups: list[Group], mods: dict[str, nn.Module],
                        stats: dict[str, dict | None], probe: Callable[[], torch.Tensor], prefix: str) -> list[dict]:
        """Reference RTN errors, the method's optional block transform, then quantize and swap each layer."""
        rtn_err = {n: _rtn_out_err(weight_2d(mods[n]), stats[n], self.scheme) for g in groups for n in g.names}
        notes: dict[str, dict] = {n: {} for g in groups for n in g.names}
        if hasattr(self.method, "transform_block"):
            stats = self.method.transform_block(block, groups, mods, stats, self.scheme, probe=probe,
                                                runtime_scale=RUNTIME_INPUT_SCALE, info=notes,
                                                **_args_for(self.method.transform_block, self.args))
        report = []
        for g in groups:
            for n in g.names:
                full = f"{prefix}{n}"
                t0 = time.perf_counter()
                w = weight_2d(mods[n])
                qw = self.method.quantize(w, stats[n], self.scheme, name=f"{full}.weight", info=notes[n],
                                          **_args_for(self.method.quantize, self.method_args()))
                # modules are built on the CPU: move the packed one to where its block runs
                set_submodule(block, n, make_quant_module(mods[n], qw, self.name).to(w.device))
                err = _out_rel_err(w, dequantize_weight(qw).to(w.device), stats[n])
                report.append(layer_report(full, w, qw, self.name, time.perf_counter() - t0,
                                           out_rel_err_before=rtn_err[n], out_rel_err=err, **notes[n]))
        return report


def _split_args(method: ModuleType, args: dict) -> tuple[dict, dict]:
    engine = {k: v for k, v in args.items() if k in ENGINE_ARGS}
    rest = {k: v for k, v in args.items() if k not in ENGINE_ARGS}
    accepted = set(inspect.signature(method.quantize).parameters)
    if hasattr(method, "transform_block"):
        accepted |= set(inspect.signature(method.transform_block).parameters)
    unknown = sorted(set(rest) - accepted)
    if unknown:
        raise BitsmithError(f"method {method.__name__.rsplit('.', 1)[-1]} has no option(s) {', '.join(unknown)}")
    return engine, rest


def _args_for(fn: Callable, args: dict) -> dict:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in args.items() if k in params}


# ---- the block walk --------------------------------------------------------------------------------------
def _walk_blocks(model: nn.Module, prefix: str, blocks: nn.ModuleList, inside: dict[str, nn.Module],
                 ids: torch.Tensor, run: _Run, batch_size: int, device: torch.device, progress: bool) -> list[dict]:
    home = _home_device(model)
    _move_outside(model, prefix, device)
    try:
        batches = capture_inputs(model, blocks[0], ids, batch_size, device)
    finally:
        _move_outside(model, prefix, home)
    report: list[dict] = []
    # Blocks after the last one holding a target need no visit: their inputs feed nothing quantized.
    last = max(i for i in range(len(blocks)) if any(n.startswith(f"{prefix}.{i}.") for n in inside))
    for i, block in progress_bar(list(enumerate(blocks))[:last + 1], progress, f"{run.name} {run.scheme.label()}",
                                  "block"):
        bp = f"{prefix}.{i}."
        targets = {n[len(bp):]: inside.pop(n) for n in [k for k in inside if k.startswith(bp)]}
        block_home = _home_device(block)
        block.to(device)
        t0 = time.perf_counter()
        plan = None
        try:
            if targets:
                block_report, plan = quantize_block(block, targets, batches, run, bp, keep_plan=True)
                report += block_report
            if i < last:
                for j, b in enumerate(batches):               # quantized outputs feed the next block
                    batches[j] = _with_hidden(b, run_block(block, b))
        finally:
            if plan is not None:
                plan.close()
        block.to(block_home)
        log.info("block %d/%d done in %.1f s", i + 1, len(blocks), time.perf_counter() - t0)
    return report


def _whole_model(model: nn.Module, targets: dict[str, nn.Module], ids: torch.Tensor, run: _Run,
                 batch_size: int, device: torch.device) -> list[dict]:
    home = _home_device(model)
    model.to(device)
    try:
        kw = _call_kwargs(model)
        batches = [((chunk.to(device),), dict(kw)) for chunk in _chunks(ids, batch_size)]
        return quantize_block(model, targets, batches, run, "")
    finally:
        model.to(home)


def quantize_block(block: nn.Module, targets: dict[str, nn.Module], batches: list[Batch], run: _Run,
                   prefix: str, keep_plan: bool = False):
    """Observe and quantize the target layers of one block (names relative to it), in place. With
    `keep_plan`, returns (report, replay plan or None): the plan's replays stay swapped in (they speed up
    the propagation pass) until the caller's `plan.close()`."""
    groups, once = trace_groups(block, targets, batches[0])
    missed = [n for n in targets if not any(n in g.names for g in groups)]
    if missed:
        log.warning("%s: %s never called on calibration data; quantized without statistics",
                    prefix or "model", ", ".join(missed))
        groups.append(Group(missed))
    phases = [[g] for g in groups] if run.sequential else [groups]
    report = []
    plan = replay.Plan(block, targets, batches[0], run_block) if run.replay and once else None
    try:
        for phase in phases:
            names = [n for g in phase for n in g.names]
            with plan.capture(names) if plan is not None else nullcontext():
                stats = observe(block, targets, phase, batches, run.method.NEEDS, early_stop=once)
            report += run.quantize_groups(block, phase, targets, stats, lambda: run_block(block, batches[0]), prefix)
            if plan is not None:
                plan.activate(names)
    except BaseException:
        if plan is not None:
            plan.close()
        raise
    if keep_plan:
        return report, plan
    if plan is not None:
        plan.close()
    return report


def trace_groups(block: nn.Module, targets: dict[str, nn.Module], batch: Batch) -> tuple[list[Group], bool]:
    """Run one batch and group the targets by the identity of their input tensor, in call order; also
    return whether every target ran exactly once (then a pass can stop after its last target)."""
    calls: list[tuple[str, torch.Tensor]] = []       # references keep tensors alive: `is` stays meaningful
    made: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(_record_input(n, calls)) for n, m in targets.items()]
    for name, mod in block.named_modules():
        if _norm_like(mod) and name not in targets:
            handles.append(mod.register_forward_hook(_record_output(name, made)))
    try:
        run_block(block, batch)
    finally:
        for h in handles:
            h.remove()
    groups: list[Group] = []
    inputs: list[torch.Tensor] = []
    for name, x in calls:
        hit = next((i for i, t in enumerate(inputs) if t is x), None)
        if hit is None:
            src = next((n for n, out in made if out is x), None)
            groups.append(Group([name], src))
            inputs.append(x)
        elif name not in groups[hit].names:
            groups[hit].names.append(name)
    counts = [sum(1 for n, _ in calls if n == name) for name in targets]
    return groups, all(c == 1 for c in counts)


def _record_input(name: str, calls: list):
    def hook(mod, args):
        if args and isinstance(args[0], torch.Tensor):
            calls.append((name, args[0]))
    return hook


def _record_output(name: str, made: list):
    def hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            made.append((name, out))
    return hook


def _norm_like(mod: nn.Module) -> bool:
    """A leaf with a 1-D weight (LayerNorm, RMSNorm): the fold target AWQ looks for."""
    w = getattr(mod, "weight", None)
    return not any(True for _ in mod.children()) and isinstance(w, torch.Tensor) and w.dim() == 1


def observe(block: nn.Module, targets: dict[str, nn.Module], groups: list[Group], batches: list[Batch],
            needs: tuple[str, ...], *, early_stop: bool = True) -> dict[str, dict | None]:
    """Statistics of each group's input over all batches (one set per group, shared by its layers).
    With `early_stop` each pass ends as soon as every layer of `groups` has seen its input."""
    obs: dict[str, dict] = {}
    for g in groups:
        lead = targets[g.names[0]]
        if observable(lead):
            obs[g.names[0]] = make_observers(needs, in_features(lead), _home_device(lead))
    pending: set[str] = set()
    wanted = {n for g in groups for n in g.names}

    def make_hook(name: str):
        def hook(mod, args):
            if name in obs:
                x = features(mod, args[0])
                for o in obs[name].values():
                    o.update(x)
            pending.discard(name)
            if early_stop and not pending:
                raise _Stop
        return hook

    handles = [targets[n].register_forward_pre_hook(make_hook(n)) for n in wanted]
    try:
        for b in batches:
            pending.clear()
            pending.update(wanted)
            try:
                run_block(block, b)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict | None] = {}
    for g in groups:
        lead = obs.get(g.names[0])
        for n in g.names:
            out[n] = None if lead is None else {k: o.result() for k, o in lead.items()}
    return out


# ---- capturing and running blocks ------------------------------------------------------------------------
def capture_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor, batch_size: int,
                   device: torch.device) -> list[Batch]:
    """The (args, kwargs) block 0 receives for each calibration batch. The first batch holds one sample:
    it is the cheap probe used for tracing and for checking output-preserving transforms."""
    caught: list[Batch] = []

    def hook(mod, args, kwargs):
        caught.append((_to(args, device), _to(kwargs, device)))
        raise _Stop

    kw = _call_kwargs(model)
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in _chunks(ids, batch_size):
            try:
                model(chunk.to(device), **kw)
            except _Stop:
                continue
            raise BitsmithError("the model's forward never reached its first block; cannot calibrate it")
    finally:
        handle.remove()
    return caught


def _chunks(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise BitsmithError(f"batch_size must be positive, got {batch_size}")
    return [ids[:1], *ids[1:].split(batch_size)] if ids.shape[0] > 1 else [ids]


def _call_kwargs(model: nn.Module) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}     # no KV cache during calibration


def run_block(block: nn.Module, batch: Batch) -> torch.Tensor:
    args, kwargs = batch
    return _first_tensor(block(*args, **kwargs))


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        return _first_tensor(out[0])
    raise BitsmithError(f"cannot find the output tensor in a {type(out).__name__}")


def _with_hidden(batch: Batch, h: torch.Tensor) -> Batch:
    args, kwargs = batch
    if args:
        return (h, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": h}
    raise BitsmithError("block 0 was called without a positional input or hidden_states=; cannot propagate")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _home_device(mod: nn.Module) -> torch.device:
    t = next(iter(mod.parameters()), None)
    if t is None:
        t = next(iter(mod.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _move_outside(model: nn.Module, prefix: str, device: torch.device) -> None:
    """Move every parameter and buffer outside the block list `prefix` to `device` (embeddings, rotary)."""
    for name, mod in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for p in mod.parameters(recurse=False):
            if p.device != device:
                p.data = p.data.to(device)
        for key, b in list(mod.named_buffers(recurse=False)):
            if b.device != device:
                setattr(mod, key, b.to(device))


# ---- output error from the second moment -----------------------------------------------------------------
def _out_rel_err(w: torch.Tensor, dq: torch.Tensor, stats: dict | None) -> float | None:
    """||X W^T - X Q^T|| / ||X W^T|| over all calibration rows, from H = X^T X / T."""
    h = None if stats is None else stats.get("hessian")
    if h is None:
        return None
    w = w.to(h.device, torch.float32)
    d = w - dq.to(h.device, torch.float32)
    num = ((d @ h) * d).sum()
    den = ((w @ h) * w).sum()
    return float((num / den.clamp(min=1e-30)).clamp(min=0).sqrt())


def _rtn_out_err(w: torch.Tensor, stats: dict | None, scheme: Scheme) -> float | None:
    if stats is None or stats.get("hessian") is None:
        return None
    return _out_rel_err(w, dequantize_weight(quantize_weight(w, scheme)), stats)
