"""W8A8 on SmolLM2-135M (perplexity) and MiniLM-L6 (embeddings), with and without SmoothQuant.

SmolLM2: held-out default text, windows of 1024 tokens, 4096 tokens (FP32: 20.001); every decoder linear
W8A8 (int8 per-channel weights, int8 activations), lm_head and embeddings fp16; static activation scales
calibrated on `--samples` x 512 tokens of the calibration text. MiniLM: mean cosine of the W8A8 sentence
embeddings to FP32's and top-1 retrieval agreement on query/document pairs from the held-out text.
One process per row keeps memory flat:

    .venv/bin/python -P benchmarks/w8a8_llm.py --model smollm2-135m --rows static,sq0.5 [--observer minmax]
    .venv/bin/python -P benchmarks/w8a8_llm.py --model minilm-l6 --rows static,dynamic
Rows: fp32, static, dynamic, sqALPHA (static + SmoothQuant alpha; ALPHA may be "auto": searched per layer
group, groups without a fold target smoothed at run time), sqALPHA-dynamic, sqALPHA-rt (fixed alpha with
run-time smoothing where no fold exists).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import bitsmith
from bitsmith import Recipe, Scheme


def recipe(row: str, observer: str) -> Recipe:
    args: dict = {"observer": observer}
    if row.endswith("dynamic"):
        args["dynamic"] = True
    if row.startswith("sq"):
        alpha = row[2:].split("-")[0]
        args["smoothquant"] = alpha if alpha == "auto" else float(alpha)
    if row.endswith("-rt"):
        args["smooth_runtime"] = True
    return Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True), method_args=args)


def run_row(model_name: str, row: str, observer: str, samples: int, max_tokens: int = 4096,
            pairs: str = "held-out") -> dict:
    from bitsmith.evaluate import embed, embedding_scores, retrieval_pairs
    from bitsmith.models import load_model, load_text

    lm = load_model(model_name)
    cal, held = load_text(None)
    t0 = time.perf_counter()
    if row != "fp32":
        bitsmith.quantize(lm.model, recipe(row, observer), tokenizer=lm.tokenizer, n_samples=samples, seq_len=512)
    qs = time.perf_counter() - t0
    out = {"model": model_name, "row": row, "observer": observer, "quantize_s": round(qs, 1)}
    if model_name.startswith("minilm"):
        ref = load_model(model_name)
        # "calib-2nd-half": a second split, from text the held-out numbers never saw (calibration windows
        # may overlap it), to check that a setting chosen on the held-out pairs carries over
        qt, dt = retrieval_pairs(held if pairs == "held-out" else cal[len(cal) // 2:])
        scores = embedding_scores(embed(lm.model, lm.tokenizer, qt), embed(lm.model, lm.tokenizer, dt),
                                  embed(ref.model, ref.tokenizer, qt), embed(ref.model, ref.tokenizer, dt))
        out.update(scores, pairs=len(qt))
    else:
        out.update(bitsmith.perplexity(lm.model, lm.tokenizer, held, seq_len=1024, max_tokens=max_tokens))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="static,sq0.5")
    ap.add_argument("--observer", default="minmax")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=4096, help="SmolLM2: held-out tokens scored (1024 a window)")
    ap.add_argument("--pairs", choices=("held-out", "calib-2nd-half"), default="held-out",
                    help="MiniLM: where the 64 query/document pairs come from")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for row in a.rows.split(","):
        r = run_row(a.model, row, a.observer, a.samples, a.max_tokens, a.pairs)
        print(json.dumps(r), flush=True)
        rows.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
