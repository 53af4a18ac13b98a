"""Run many configurations on one model with the same calibration and evaluation data; collect the results.

`run_compare` plans every method x bits combination (plus optional external baselines), loads the model
and the text once, and for each configuration quantizes a fresh copy, then measures quality (perplexity,
KL to the unquantized model and top-1 agreement on the same windows; embedding cosine and retrieval
agreement for encoders), speed (prefill / decode tokens/s), peak memory, size on disk and bits per weight,
and greedy generations for a few prompts. Each finished configuration is written atomically to
`DIR/results/<config>.json` with a key of everything that determined it, so an interrupted run resumes
with `resume=True` (finished configurations are skipped and counted). report.py renders the results.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import methods
from .apply import quantize_model
from .checkpoint import save
from .errors import BitsmithError
from .progress import bar as progress_bar
from .recipe import Recipe, Scheme
from .report import atomic_write
from .size import file_bytes, size_report

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# The no-argument plan, in order; a method joins when METHODS has it at run time. Sized to finish in
# <= 15 minutes on 2 CPU cores with the default evaluation (measured: README, "Compare").
# Sized to finish in <= 15 min on 2 CPU cores: every 3-bit row costs ~1.5 min of reference-path decoding and
# GPTQ-3 another 3 min of calibration, so only RTN shows the 3-bit cliff here (`--bits 8,4,3` for the rest).
DEFAULT_PLAN: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("rtn", (8, 4, 3)), ("gptq", (4,)), ("awq", (4,)), ("hqq", (4,)), ("nf4", (4,)))
DEFAULT_BITS = (8, 4, 3)
# Methods the design plans (DESIGN.md) but this install may not have yet: skipped with a note, not an error.
PLANNED = ("gptq", "awq", "hqq", "nf4", "fp4", "llm_int8", "quip", "incoherence", "smoothquant", "binary",
           "ternary", "w8a8")
REFERENCE = "reference"
PROMPTS = ("What is the capital of France?", "Write a Python function that reverses a list.",
           "Explain in one sentence what quantization of a neural network does.")
CACHE_VERSION = 1


@dataclass(frozen=True)
class Config:
    """One row of the comparison: a bitsmith recipe, the unquantized reference, or an external baseline."""

    label: str
    recipe: Recipe | None = None        # None for the reference and for baselines
    source: str = "bitsmith"            # "bitsmith" | "reference" | a baseline name (baselines.BASELINES)
    params: dict = field(default_factory=dict)   # a baseline's bits / group size / quant type

    def key_data(self) -> dict:
        return {"label": self.label, "source": self.source, "params": self.params,
                "recipe": self.recipe.to_dict() if self.recipe is not None else None}


@dataclass(frozen=True)
class Settings:
    """Everything besides the configuration that determines a result (part of each cache key)."""

    model: str = DEFAULT_MODEL
    text: str | None = None             # path of a UTF-8 file; None = the bundled default text
    seq_len: int = 1024
    max_tokens: int = 4096
    calib_samples: int = 32             # smaller than `quantize`'s 128 so the default compare fits its budget
    calib_seq_len: int = 512
    # Decoding is the slow part on CPU (the reference QuantLinear dequantizes every weight at every token):
    # 8 timed decode steps; the 3 x 16 generated tokens run on dense copies of the weights (dense_weights).
    gen_tokens: int = 16
    prompts: tuple[str, ...] = PROMPTS
    latency_prompt: int = 128
    latency_decode: int = 8


# ---- planning ----------------------------------------------------------------------------------------
def parse_methods(spec: str | list[str] | None) -> list[tuple[str, int | None]] | None:
    """"rtn,gptq,nf4@4" -> [("rtn", None), ("gptq", None), ("nf4", 4)]; None stays None (default plan)."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, b = item.partition("@")
        if b and not (b.isdigit() and 1 <= int(b) <= 8):
            raise BitsmithError(f"--methods: {item!r} must be NAME or NAME@BITS with BITS in 1..8")
        out.append((name.strip(), int(b) if b else None))
    if not out:
        raise BitsmithError("--methods is empty; name at least one method, e.g. --methods rtn")
    return out


def scheme_for(method: str, bits: int, group_size: int | None) -> Scheme:
    """The scheme asked of a method at `bits`: the method's own `scheme_for(bits, group_size)` when it has
    one, else an asymmetric int grid; 8 bits is per-channel, the field's convention (its error is already
    negligible, so groups only cost size)."""
    mod = methods.METHODS.get(method)
    if mod is not None and hasattr(mod, "scheme_for"):
        return mod.scheme_for(bits, group_size)
    return Scheme(bits=bits, group_size=None if bits == 8 else group_size)


def effective_scheme(method: str, bits: int, group_size: int | None) -> tuple[Scheme | None, str | None]:
    """(the scheme `method` really quantizes with at `bits`, None) or (None, why it cannot).

    A method's BITS tuple decides when it declares one. A data-free method is probed on a small random
    weight and the scheme of the QWeight it returns is the truth: NF4 answers an int4 request with its
    nf4 codebook (so the row is labelled nf4, not int4), and a method that quietly replaces the bits asked
    for (NF4 at 3 bits, LLM.int8() at 4) cannot run at those bits. A calibrated method cannot be probed
    without statistics; its scheme is taken as asked."""
    mod = methods.get(method)
    declared = getattr(mod, "BITS", None)
    if declared is not None and bits not in declared:
        return None, f"{method} supports {', '.join(map(str, declared))} bits, not {bits}"
    scheme = scheme_for(method, bits, group_size)
    if mod.NEEDS:
        return scheme, None
    try:
        w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))  # (N, K)
        got = mod.quantize(w, None, scheme, name="probe").scheme
    except Exception as e:   # noqa: BLE001  (a method that is broken right now is skipped, not fatal)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return None, f"{method} cannot quantize at {bits} bits ({type(e).__name__}: {first})"
    if got.bits != bits:
        return None, f"{method} quantizes to {got.bits} bits only, not {bits}"
    return got, None


def unsupported(method: str, bits: int, group_size: int | None) -> str | None:
    """Why `method` cannot run at `bits`, or None when it can."""
    return effective_scheme(method, bits, group_size)[1]


def plan(method_spec: list[tuple[str, int | None]] | None, bits: list[int] | None,
         group_size: int | None) -> tuple[list[Config], list[str]]:
    """Configurations for every method x bits, plus notes on what was skipped. A method name that is
    neither registered nor planned is an error listing the valid ones; a planned method missing from
    this install is skipped with a note. An explicit method at explicit bits it cannot do is an error;
    combinations from the default plan or default bits are skipped with a note."""
    notes: list[str] = []
    explicit_bits = bits is not None
    if method_spec is None:
        wanted = [(m, b) for m, bs in DEFAULT_PLAN for b in (bits if explicit_bits else bs)]
        missing = sorted({m for m, _ in wanted if m not in methods.METHODS}, key=[m for m, _ in DEFAULT_PLAN].index)
        if missing:
            notes.append(f"default plan: {', '.join(missing)} not available in this install, skipped")
        wanted = [(m, b) for m, b in wanted if m in methods.METHODS]
        strict = False
    else:
        wanted = []
        for name, b in method_spec:
            if name not in methods.names():
                if name not in PLANNED:
                    raise BitsmithError(f"unknown method {name!r}; valid methods: {', '.join(methods.names())}")
                notes.append(f"skipped method {name!r}: not available yet (have: {', '.join(methods.names())})")
                continue
            if name in methods.CAST_METHODS:
                wanted.append((name, None))
                continue
            wanted += [(name, b)] if b is not None else [(name, x) for x in (bits or DEFAULT_BITS)]
        strict = explicit_bits
    configs: list[Config] = []
    for name, b in wanted:
        if b is None:   # a cast (fp16 / bf16): one row, no bits
            configs.append(Config(label=name, recipe=Recipe(method=name)))
            continue
        scheme, why = effective_scheme(name, b, group_size)
        if why is not None:
            if strict:
                raise BitsmithError(f"{why}; drop {b} from --bits or write {name}@BITS in --methods")
            notes.append(f"skipped {name} at {b} bits: {why}")
            continue
        recipe = Recipe(method=name, scheme=scheme)
        label = f"{name} {recipe.scheme.label()}"
        if label not in {c.label for c in configs}:
            configs.append(Config(label=label, recipe=recipe))
    return configs, notes


# ---- output directory --------------------------------------------------------------------------------
def check_output_dir(out: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Fail before any work when `out` cannot be written, or already holds a comparison and neither
    `resume` nor `overwrite` says what to do with it; creates nothing (a probe file is removed)."""
    if out.exists() and not out.is_dir():
        raise BitsmithError(f"output {out} exists and is not a directory; choose another --output")
    if not (resume or overwrite) and ((out / "report.json").exists() or (out / "results").is_dir()):
        raise BitsmithError(f"{out} already holds a comparison; pass --resume to reuse its finished "
                            "configurations, --overwrite to recompute them, or another --output")
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise BitsmithError(f"cannot create output {out}: {probe_dir} is a file; choose another --output")
    try:   # a real write: os.access says yes to root on read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".bitsmith-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BitsmithError(f"cannot write to {probe_dir} ({e.strerror}); choose another --output") from e


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


# ---- the run -----------------------------------------------------------------------------------------
class Session:
    """State shared by every configuration of one compare: the loaded model, the evaluation windows, the
    reference's log-probabilities (computed once, lazily: a fully resumed run never needs them), the
    calibration arguments and the generation prompts."""

    def __init__(self, lm: Any, settings: Settings, out: Path, progress: bool = False) -> None:
        from .models import chat_prompt_ids, load_text

        self.lm, self.settings, self.out, self.progress = lm, settings, out, progress
        self.calib_text, self.eval_text = load_text(settings.text)
        self.causal = lm.kind == "causal-lm"
        self._ref: list[torch.Tensor] | None = None
        self._ref_emb: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.causal:
            from .evaluate import eval_windows

            self.windows = eval_windows(lm.tokenizer, self.eval_text, seq_len=settings.seq_len,
                                        max_tokens=settings.max_tokens)   # (W, L); errors on short text
            self.prompts = [chat_prompt_ids(lm.tokenizer, p) for p in settings.prompts]
        else:
            from .evaluate import retrieval_pairs

            self.windows = None
            self.queries, self.docs = retrieval_pairs(self.eval_text)
        text_hash = hashlib.sha256(self.eval_text.encode() + b"\0" + self.calib_text.encode()).hexdigest()[:16]
        self.fingerprint = {"version": CACHE_VERSION, "model": settings.model, "name": lm.name,
                            "weights": sum(p.numel() for p in lm.model.parameters()), "text": text_hash,
                            "settings": {k: v for k, v in asdict(settings).items() if k not in ("model", "text")}}

    # -- cache --
    def key(self, cfg: Config) -> str:
        blob = json.dumps({"config": cfg.key_data(), "session": self.fingerprint}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def result_path(self, cfg: Config) -> Path:
        return self.out / "results" / f"{slug(cfg.label)}.json"

    def cached(self, cfg: Config) -> dict | None:
        path = self.result_path(cfg)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data.get("row") if data.get("key") == self.key(cfg) else None

    def store(self, cfg: Config, row: dict) -> None:
        data = {"key": self.key(cfg), "config": cfg.key_data(), "row": row}
        atomic_write(self.result_path(cfg), json.dumps(data, indent=1, default=_json_default) + "\n")

    # -- reference --
    def reference(self) -> list[torch.Tensor]:
        if self._ref is None:
            from .evaluate import reference_logprobs

            self._ref = reference_logprobs(self.lm.model, self.windows, progress=self.progress)
        return self._ref

    def reference_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ref_emb is None:
            self._ref_emb = self.embed(self.lm.model)
        return self._ref_emb

    def embed(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        from .evaluate import embed

        return embed(model, self.lm.tokenizer, self.queries), embed(model, self.lm.tokenizer, self.docs)

    def calibration(self, recipe: Recipe | None) -> dict:
        """Calibration keyword arguments for a calibrated method (the same data for every one of them)."""
        if recipe is None or recipe.method not in methods.METHODS or not methods.get(recipe.method).NEEDS:
            return {}
        return {"tokenizer": self.lm.tokenizer, "calib_text": self.calib_text,
                "n_samples": self.settings.calib_samples, "seq_len": self.settings.calib_seq_len}

    # -- measuring --
    def measure(self, model: Any, *, is_reference: bool = False) -> dict:
        """Quality, speed and generations of one model (an nn.Module or a logits callable)."""
        from .evaluate import dense_weights, embedding_scores, generate_texts, latency, score_windows

        s = self.settings
        row: dict[str, Any] = {}
        if self.causal:
            if is_reference:
                row.update(_score_reference(self.reference(), self.windows))
            else:
                row.update(score_windows(model, self.windows, self.reference(), progress=self.progress))
            prompt = self.windows[0, : s.latency_prompt].unsqueeze(0)  # (1, P)
            if not isinstance(model, nn.Module) and hasattr(model, "latency"):   # an external runtime
                row.update(model.latency(prompt, new_tokens=s.latency_decode))
            else:
                row.update(latency(model, prompt, new_tokens=s.latency_decode))
            if s.gen_tokens > 0:
                with dense_weights(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
                    row["generations"] = generate_texts(model, self.lm.tokenizer, self.prompts, s.gen_tokens)
        else:
            q, d = self.embed(model)
            row.update(embedding_scores(q, d, *self.reference_embeddings()))
            prompt = self.lm.tokenizer(self.eval_text[:2000], return_tensors="pt")["input_ids"][:, : s.latency_prompt]
            row.update(latency(model, prompt, new_tokens=0))
        return row


def _score_reference(ref: list[torch.Tensor], windows: torch.Tensor) -> dict:
    """The reference row from its stored log-probs: perplexity, and KL 0 / top-1 1 by definition."""
    import math

    nll = sum(-lp.float().gather(-1, w[1:].reshape(-1, 1)).double().sum().item() for lp, w in zip(ref, windows))
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": windows.shape[0],
            "kl": 0.0, "kl_p99": 0.0, "top1": 1.0}


def run_config(session: Session, cfg: Config) -> dict:
    """Quantize a fresh copy of the model as `cfg` says, measure it, and return its row."""
    from .evaluate import PeakMemory

    row: dict[str, Any] = {"config": cfg.label, "source": cfg.source}
    with PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        if cfg.source == "bitsmith":
            model = copy.deepcopy(session.lm.model)
            layers = quantize_model(model, cfg.recipe, progress=session.progress, **session.calibration(cfg.recipe))
            row.update(_recipe_fields(cfg.recipe), layers=_layer_errors(layers))
            info: dict = {}
        elif cfg.source == REFERENCE:
            model, info = session.lm.model, {}
            row.update(method="none", bits=_float_bits(model), group_size=None)
        else:
            from .baselines import build

            model, info = build(cfg, session.lm, session.settings.model)
            row.update(method=cfg.source, bits=cfg.params.get("bits"), group_size=cfg.params.get("group_size"))
        row["quantize_seconds"] = round(time.perf_counter() - t0, 2)
        row.update(session.measure(model, is_reference=cfg.source == REFERENCE))
    row["memory"] = mem.result()
    row["cpu_seconds"] = round(time.process_time() - c0, 1)
    if isinstance(model, nn.Module) and cfg.source in ("bitsmith", REFERENCE):
        size = size_report(model)
        row.update(size_bytes=size["payload_bytes"], memory_bytes=size["memory_bytes"],
                   bits_per_weight=size["bits_per_weight"], quantized_bpw=size["quantized_bpw"],
                   file_bytes=_saved_bytes(model, session.out))
    row.update(info)      # a baseline reports its own size and notes
    return row


def _recipe_fields(recipe: Recipe) -> dict:
    cast = recipe.method in methods.CAST_METHODS
    return {"method": recipe.method, "bits": None if cast else recipe.scheme.bits,
            "group_size": None if cast else recipe.scheme.group_size,
            "scheme": None if cast else recipe.scheme.label()}


def _float_bits(model: nn.Module) -> int:
    p = next(model.parameters(), None)
    return 8 * p.element_size() if p is not None else 32


def _layer_errors(report: list[dict]) -> dict[str, dict]:
    """Per-layer errors kept for the heatmap: weight SQNR, relative weight error, output error if any."""
    keep = ("sqnr_db", "weight_rel_err", "out_rel_err", "rel_out_err")
    return {r["name"]: {k: _finite(r[k]) for k in keep if k in r} for r in report}


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))) else v


def _saved_bytes(model: nn.Module, out: Path) -> int:
    """Bytes of the model's safetensors file, measured by really saving it (then removed)."""
    tmp = out / f".size-{uuid.uuid4().hex[:8]}"
    try:
        return file_bytes(save(model, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def run_compare(model: str | None = None, *, methods: str | list[str] | None = None, bits: list[int] | None = None,
                group_size: int | None = 64, output: str | Path = "out/compare", resume: bool = False,
                overwrite: bool = False,
                baselines: list[str] | None = None, settings: Settings | None = None,
                progress: bool = False, on_start: Callable[[Config], None] | None = None) -> dict:
    """Run the comparison; returns {"rows", "notes", "resumed", "computed", ...} (report.py's input).

    Bad input fails before any model is loaded or any file written: unknown methods, unsupported bits,
    unknown baselines, an unwritable output directory; a text shorter than one window fails before any
    quantization."""
    from .models import load_any, quiet_transformers

    settings = settings or Settings()
    if model is not None:
        settings = Settings(**{**asdict(settings), "model": model})
    configs, notes = plan(parse_methods(methods), bits, group_size)
    if baselines:
        from . import baselines as bl

        extra, bnotes = bl.plan(baselines, bits or [8, 4], group_size)
        configs, notes = configs + extra, notes + bnotes
    for n in notes:
        log.warning(n)
    out = Path(output)
    check_output_dir(out, resume=resume, overwrite=overwrite)
    quiet_transformers()
    t_start = time.perf_counter()
    lm = load_any(settings.model)
    session = Session(lm, settings, out, progress=progress)
    ref_label = f"fp{_float_bits(lm.model)} (unquantized)"
    configs = [Config(label=ref_label, source=REFERENCE), *configs]
    rows, resumed, failed = [], 0, 0
    bar = progress_bar(configs, progress, "compare", "config", leave=True, position=0)
    for cfg in bar:
        if hasattr(bar, "set_description_str"):
            bar.set_description_str(f"compare [{cfg.label}]")
        if on_start is not None:
            on_start(cfg)
        row = session.cached(cfg) if resume else None
        if row is not None:
            resumed += 1
            log.info("resumed %s from %s", cfg.label, session.result_path(cfg))
        else:
            try:
                row = run_config(session, cfg)
            except Exception as e:   # noqa: BLE001  (KeyboardInterrupt is not an Exception: it still stops)
                if cfg.source == REFERENCE:
                    raise
                # One broken method or external package costs its row, not the whole comparison: the
                # failure is a note in the report (and is not cached, so --resume retries it).
                what = "baseline " if cfg.source != "bitsmith" else ""
                first = (str(e).strip().splitlines() or [""])[0][:300]
                notes.append(f"{what}{cfg.label} failed: {type(e).__name__}: {first}")
                log.warning(notes[-1])
                log.debug("%s failed", cfg.label, exc_info=True)
                failed += 1
                continue
            session.store(cfg, row)
        rows.append(row)
    add_deltas(rows)
    return {"model": settings.model, "model_name": lm.name, "kind": lm.kind, "settings": asdict(settings),
            "group_size": group_size, "rows": rows, "notes": notes, "resumed": resumed,
            "computed": len(rows) - resumed, "failed": failed, "wall_seconds": round(time.perf_counter() - t_start, 1),
            "environment": _environment()}


def add_deltas(rows: list[dict]) -> None:
    """dPPL (absolute and %) of every row to the reference row (the first), in place."""
    if not rows or rows[0].get("ppl") is None:
        return
    base = rows[0]["ppl"]
    for r in rows:
        if r.get("ppl") is not None:
            r["dppl"] = r["ppl"] - base
            r["dppl_pct"] = 100 * (r["ppl"] - base) / base


def _environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# ---- kept for benchmarks/size_table.py: one pass of size and perplexity ------------------------------
def evaluate_configs(lm, configs: list[tuple[str, Recipe | None]], eval_text: str, *, seq_len: int = 1024,
                     max_tokens: int = 4096, progress: bool = False, save_root: Path | None = None,
                     calibration: dict | None = None) -> list[dict]:
    """One row (size, perplexity, dPPL) per (label, recipe); `None` as recipe is the unquantized model.
    With `save_root`, each model is also saved there and the row gets the measured `file_bytes`."""
    from .evaluate import perplexity

    rows = []
    base_ppl = None
    for label, recipe in configs:
        model = lm.model if recipe is None else copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        if recipe is not None:
            needs = recipe.method in methods.METHODS and methods.get(recipe.method).NEEDS
            quantize_model(model, recipe, progress=progress, **((calibration or {}) if needs else {}))
        qsec = time.perf_counter() - t0
        size = size_report(model)
        row = {"config": label, "method": recipe.method if recipe else "none",
               "bits": recipe.scheme.bits if recipe and recipe.method not in methods.CAST_METHODS else None,
               "group_size": recipe.scheme.group_size if recipe else None,
               "size_bytes": size["payload_bytes"], "memory_bytes": size["memory_bytes"],
               "bits_per_weight": size["bits_per_weight"], "quantized_bpw": size["quantized_bpw"],
               "quantize_seconds": round(qsec, 2)}
        if lm.kind == "causal-lm":
            res = perplexity(model, lm.tokenizer, eval_text, seq_len=seq_len, max_tokens=max_tokens, progress=progress)
            row.update({"ppl": res["ppl"], "tokens": res["tokens"]})
            if recipe is None:
                base_ppl = res["ppl"]
            row["dppl"] = None if base_ppl is None else res["ppl"] - base_ppl
        if save_root is not None:
            out = save(model, Path(save_root) / slug(label), overwrite=True)
            row["file_bytes"] = file_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
    return rows
