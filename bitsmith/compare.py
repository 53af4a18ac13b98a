"""Run several recipes on one model with the same evaluation text and collect size and perplexity.

Each configuration quantizes a fresh copy of the loaded model, so the model is read from disk once.
Methods that bitsmith does not have (yet) are skipped with a note, not an error.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
import time
from pathlib import Path

from . import methods
from .apply import quantize_model
from .recipe import Recipe, Scheme
from .checkpoint import save
from .size import file_bytes, size_report

log = logging.getLogger(__name__)


def plan(method_names: list[str], bits: list[int], group_size: int | None) -> tuple[list[tuple[str, Recipe]], list[str]]:
    """(label, recipe) for every method x bits, plus notes for what was skipped."""
    configs, notes = [], []
    for m in method_names:
        m = m.strip()
        if m in methods.CAST_METHODS:
            configs.append((m, Recipe(method=m)))
            continue
        if m not in methods.METHODS:
            notes.append(f"skipped method {m!r}: not available (have: {', '.join(methods.names())})")
            continue
        for b in bits:
            g = None if b == 8 else group_size     # 8-bit per-channel is the field's convention
            r = Recipe(method=m, scheme=Scheme(bits=b, group_size=g))
            configs.append((f"{m} {r.scheme.label()}", r))
    return configs, notes


def evaluate_configs(lm, configs: list[tuple[str, Recipe | None]], eval_text: str, *, seq_len: int = 1024,
                     max_tokens: int = 4096, progress: bool = False, save_root: Path | None = None) -> list[dict]:
    """One row per configuration; `None` as recipe is the unquantized model. With `save_root`, each model
    is also saved there and the row gets the measured `file_bytes`."""
    from .evaluate import perplexity

    rows = []
    base_ppl = None
    for label, recipe in configs:
        model = lm.model if recipe is None else copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        if recipe is not None:
            quantize_model(model, recipe, progress=progress)
        qsec = time.perf_counter() - t0
        size = size_report(model)
        row = {"config": label, "method": recipe.method if recipe else "none",
               "bits": recipe.scheme.bits if recipe and recipe.method not in methods.CAST_METHODS else None,
               "group_size": recipe.scheme.group_size if recipe else None,
               "size_bytes": size["payload_bytes"], "memory_bytes": size["memory_bytes"], "bits_per_weight": size["bits_per_weight"],
               "quantized_bpw": size["quantized_bpw"], "quantize_seconds": round(qsec, 2)}
        if lm.kind == "causal-lm":
            res = perplexity(model, lm.tokenizer, eval_text, seq_len=seq_len, max_tokens=max_tokens, progress=progress)
            row.update({"ppl": res["ppl"], "tokens": res["tokens"]})
            if recipe is None:
                base_ppl = res["ppl"]
            row["dppl"] = None if base_ppl is None else res["ppl"] - base_ppl
        if save_root is not None:
            out = save(model, Path(save_root) / _slug(label), overwrite=True)
            row["file_bytes"] = file_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        if model is not lm.model:
            del model
    return rows


def run_compare(spec: str, *, methods: list[str], bits: list[int], group_size: int | None, text: str | None,
                seq_len: int, max_tokens: int, progress: bool = False) -> list[dict]:
    from .models import load_any, load_text

    configs, notes = plan(methods, bits, group_size)
    for n in notes:
        log.warning(n)
    lm = load_any(spec)
    _, eval_text = load_text(text)
    return evaluate_configs(lm, [("fp32 (unquantized)", None), *configs], eval_text, seq_len=seq_len,
                            max_tokens=max_tokens, progress=progress)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


def render_table(rows: list[dict]) -> str:
    head = ["config", "size MB", "vs fp32", "bits/weight", "ppl", "dPPL", "quantize s"]
    base = rows[0]["size_bytes"] if rows else 1
    lines = [head]
    for r in rows:
        lines.append([r["config"], f"{r['size_bytes'] / 1e6:.1f}", f"{100 * r['size_bytes'] / base:.1f}%",
                      f"{r['bits_per_weight']:.2f}", _f(r.get("ppl")), _f(r.get("dppl"), signed=True),
                      f"{r['quantize_seconds']:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _f(v, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"
