"""QLoRA: low-rank adapters trained on a frozen quantized base (NF4 by default, any bitsmith linear works).

`add_lora` swaps each selected quantized linear for a `LoraLinear` holding it, frozen, plus two small float
matrices A (r, K) and B (N, r): y = base(x) + (alpha / r) * x A^T B^T. B starts at zero, so the adapted
model starts exactly at the base. Only A and B train; the base stays packed in its 4-bit storage.

Memory is the point of QLoRA: `FrozenQuantMatmul` dequantizes the base weight inside the forward and again
inside the backward instead of letting autograd keep the dense float weight of every layer alive until the
backward pass (which would cost a full float copy of the model). The base weight needs no gradient, and the
gradient of x needs only the weight, so nothing else is saved either.

Afterwards: `save_adapters` writes the adapters alone (safetensors, PEFT's names and adapter_config.json, so
PEFT can put them on the float base too), `merge` folds them into the weights and re-quantizes with the
base's own method and scheme, leaving an ordinary bitsmith quantized model that saves and exports as usual.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import methods
from .errors import BitsmithError
from .nn import Int8MixedLinear, QuantLinear
from .progress import bar as progress_bar
from .select import matches, set_submodule

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("*",)   # glob / re: patterns on module names (select.matches); "*" = every
    seed: int = 0                       # quantized linear

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise BitsmithError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise BitsmithError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class FrozenQuantMatmul(torch.autograd.Function):
    """x @ dequantize(base)^T with the dense weight rebuilt in backward rather than saved (see module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: QuantLinear) -> torch.Tensor:
        ctx.base = base
        return F.linear(x, base.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.base.dequantize(grad_out.dtype), None


class LoraLinear(nn.Module):
    """A frozen quantized linear plus a trainable low-rank update (A: (r, K), B: (N, r))."""

    def __init__(self, base: QuantLinear, config: LoraConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scaling = config.rank, config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank))
        # A as nn.Linear initialises its weight (PEFT does the same); B = 0 keeps the start at the base
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The adapters' contribution to the weight, (N, K) float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = FrozenQuantMatmul.apply(x, self.base)
        if self.base.bias is not None:
            y = y + self.base.bias.to(y.dtype)
        low = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + low * self.scaling


def add_lora(model: nn.Module, config: LoraConfig = LoraConfig()) -> list[str]:
    """Swap every selected quantized linear for a LoraLinear and freeze everything else; returns the names."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise BitsmithError("this model already has LoRA adapters; merge or reload the base before adding more")
    chosen = [(n, m) for n, m in model.named_modules()
              if _wrappable(m) and any(matches(n, p) for p in config.targets)]
    if not chosen:
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, Int8MixedLinear)})
        hint = (f"its quantized linears are {', '.join(kinds)}, which LoRA does not wrap"
                if kinds else "quantize it first (QLoRA: --method nf4)")
        raise BitsmithError(f"no quantized linear matches the LoRA targets {list(config.targets)}; {hint}")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    for name, mod in chosen:
        lora = LoraLinear(mod, config, gen).to(mod.qcodes.device)
        set_submodule(model, name, lora)
    model.bitsmith_lora = config
    return [n for n, _ in chosen]


def _wrappable(m: nn.Module) -> bool:
    # dequantize() gives these classes' effective weight (Hadamard and input-scale transforms included);
    # LLM.int8() quantizes activations at run time, which a float low-rank path around it cannot mirror
    return isinstance(m, QuantLinear) and not isinstance(m, Int8MixedLinear)


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- training ---------------------------------------------------------------------------------------------
def finetune(model: nn.Module, batches: torch.Tensor, *, steps: int, batch_size: int = 4, lr: float = 2e-4,
             weight_decay: float = 0.0, seed: int = 0, progress: bool = False,
             on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Causal-LM fine-tune of the adapters on token windows `batches` (n, L): AdamW, linear warm-up over the
    first 10% of steps, windows drawn in a seeded order. Returns the training loss of each step."""
    params = lora_parameters(model)
    if not params:
        raise BitsmithError("the model has no LoRA adapters; call add_lora first")
    if batches.dim() != 2 or batches.shape[1] < 2:
        raise BitsmithError(f"training windows must be (n, L >= 2) token ids, got shape {tuple(batches.shape)}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(batches.shape[0], generator=gen)
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for step in progress_bar(range(steps), progress, "qlora", "step"):
            idx = order[(torch.arange(batch_size) + step * batch_size) % order.numel()]
            ids = batches[idx]
            loss = causal_lm_loss(model, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        model.train(was_training)
    return losses


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the windows (logits at 0..L-2 predict tokens 1..L-1)."""
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


# ---- after training ---------------------------------------------------------------------------------------
def save_adapters(model: nn.Module, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """The adapters alone, with PEFT's tensor names and adapter_config.json. Written atomically."""
    from safetensors.torch import save_file

    from .checkpoint import _replace_dir, check_output

    mods = lora_modules(model)
    if not mods:
        raise BitsmithError("the model has no LoRA adapters to save")
    out = Path(out_dir)
    check_output(out, overwrite)
    config: LoraConfig = getattr(model, "bitsmith_lora", LoraConfig(rank=mods[0][1].rank))
    tensors = {}
    for name, m in mods:
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
               "lora_dropout": config.dropout, "bias": "none",
               "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in mods}),
               "bitsmith": {"modules": [n for n, _ in mods], **asdict(config)}}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=list) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Put saved adapters back on a quantized base (the same modules they were trained on)."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    if not (d / ADAPTER_WEIGHTS).is_file() or not (d / ADAPTER_CONFIG).is_file():
        raise BitsmithError(f"{d} holds no adapters ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}); save_adapters writes them")
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    mine = cfg.get("bitsmith", {})
    names = mine.get("modules") or []
    config = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0)),
                        targets=tuple(names) or ("*",), seed=int(mine.get("seed", 0)))
    added = add_lora(model, config)
    state = load_file(str(d / ADAPTER_WEIGHTS))
    for name, m in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{part}.weight"
            if key not in state:
                raise BitsmithError(f"adapter file lacks {key}; it was trained on another model")
            getattr(m, part).data.copy_(state[key])
    return added


def merge(model: nn.Module, *, method_args: dict | None = None) -> list[dict]:
    """Fold each adapter into its weight and re-quantize with the base layer's own method and scheme, in place.
    Returns per layer the weight SQNR of the re-quantization against the merged float weight."""
    from .apply import RECIPE_ATTR, layer_report

    recipe = getattr(model, RECIPE_ATTR, None)
    args = dict(method_args if method_args is not None else (recipe.method_args if recipe is not None else {}))
    report = []
    for name, m in lora_modules(model):
        method = methods.get(m.base.method)
        if method.NEEDS:
            raise BitsmithError(f"{name}: its base was quantized with {m.base.method}, which needs calibration "
                                "data; merge supports data-free methods (nf4, rtn, hqq) - save the adapters instead")
        with torch.no_grad():
            w = m.base.dequantize(torch.float32) + m.delta_weight().to(m.base.qcodes.device)
            qw = method.quantize(w, None, m.base.scheme, name=f"{name}.weight", **args)
            new = QuantLinear.from_qweight(qw, m.base.bias, m.base.method).to(m.base.qcodes.device)
        set_submodule(model, name, new)
        report.append(layer_report(name, w, qw, m.base.method, 0.0))
    if hasattr(model, "bitsmith_lora"):
        del model.bitsmith_lora
    return report
