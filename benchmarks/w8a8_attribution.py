"""Which layers carry the static-W8A8 loss: one layer kind at a time static (calibrated per-tensor int8
activations, optionally with SmoothQuant), every other linear W8A8 dynamic (per-token, nearly lossless),
so each row's drop from the all-dynamic row is that kind's share. The model is calibrated once; a W8A8
module with act_scale 0 quantizes per token, so the other kinds are switched to dynamic by zeroing theirs
(with SmoothQuant they keep their smoothing, which per-token scales do not need but do not mind).

Kinds are module-name globs: SmolLM2 q/k/v, o_proj, gate/up, down_proj; MiniLM query/key/value, attention
output, intermediate, output (FFN down). Metrics as in w8a8_llm.py (SmolLM2: perplexity on `--max-tokens`
held-out tokens; MiniLM: embedding cosine / retrieval agreement on 64 pairs).

    .venv/bin/python -P benchmarks/w8a8_attribution.py --model smollm2-135m --samples 8 --max-tokens 2048
    .venv/bin/python -P benchmarks/w8a8_attribution.py --model minilm-l6 --smoothquant auto
"""

from __future__ import annotations

import argparse
import json

import torch

import bitsmith
from bitsmith import Recipe, Scheme

KINDS = {
    "smollm2-135m": {"qkv": ("*.q_proj", "*.k_proj", "*.v_proj"), "o_proj": ("*.o_proj",),
                     "gate/up": ("*.gate_proj", "*.up_proj"), "down_proj": ("*.down_proj",)},
    "minilm-l6": {"qkv": ("*.query", "*.key", "*.value"), "attn out": ("*.attention.output.dense",),
                  "intermediate": ("*.intermediate.dense",), "ffn out": (r"re:layer\.\d+\.output\.dense$",)},
}


def _w8a8(args: dict, targets: tuple[str, ...] = ("*",), ignore: tuple[str, ...] = ("lm_head",)) -> Recipe:
    return Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True), targets=targets,
                  ignore=ignore, method_args=args)


def calibrated(model_name: str, args: dict, samples: int):
    """The model with every linear W8A8 static (calibrated on `samples` x 512 tokens)."""
    from bitsmith.models import load_model

    lm = load_model(model_name)
    bitsmith.quantize(lm.model, _w8a8(args), tokenizer=lm.tokenizer, n_samples=samples, seq_len=512)
    return lm


def only_static(model, static: tuple[str, ...]) -> dict:
    """Zero the activation scale (-> dynamic per token) of every W8A8 layer outside the `static` globs;
    returns the saved scales so `restore` can undo it."""
    from bitsmith.nn_act import W8A8Linear
    from bitsmith.select import matches

    saved = {}
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear) and not any(matches(name, p) for p in static):
            saved[name] = m.act_scale.clone()
            m.act_scale.zero_()
    return saved


def restore(model, saved: dict) -> None:
    for name, s in saved.items():
        model.get_submodule(name).act_scale.copy_(s)


def score(model_name: str, lm, max_tokens: int) -> dict:
    from bitsmith.evaluate import embed, embedding_scores, retrieval_pairs
    from bitsmith.models import load_model, load_text

    held = load_text(None)[1]
    if model_name.startswith("minilm"):
        ref = load_model(model_name)
        qt, dt = retrieval_pairs(held)
        s = embedding_scores(embed(lm.model, lm.tokenizer, qt), embed(lm.model, lm.tokenizer, dt),
                             embed(ref.model, ref.tokenizer, qt), embed(ref.model, ref.tokenizer, dt))
        return {k: round(s[k], 4) for k in ("cosine", "cosine_min", "retrieval_agreement")}
    r = bitsmith.perplexity(lm.model, lm.tokenizer, held, seq_len=1024, max_tokens=max_tokens)
    return {"ppl": round(r["ppl"], 3), "tokens": r["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(KINDS))
    ap.add_argument("--observer", default="minmax")
    ap.add_argument("--smoothquant", default=None, help="alpha or 'auto' for the static layers")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows of 512 tokens")
    ap.add_argument("--max-tokens", type=int, default=2048, help="SmolLM2: held-out tokens scored")
    ap.add_argument("--kinds", help="comma-separated subset of the kinds (default all, plus 'none' and 'all')")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    args: dict = {"observer": a.observer}
    if a.smoothquant is not None:
        args["smoothquant"] = a.smoothquant if a.smoothquant == "auto" else float(a.smoothquant)
    kinds = {"none": (), **KINDS[a.model], "all": tuple(g for v in KINDS[a.model].values() for g in v)}
    chosen = a.kinds.split(",") if a.kinds else list(kinds)
    rows = []
    lm = calibrated(a.model, args, a.samples)
    for kind in chosen:
        saved = only_static(lm.model, kinds[kind])
        row = {"static": kind, **args, **score(a.model, lm, a.max_tokens)}
        restore(lm.model, saved)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
