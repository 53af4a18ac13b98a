"""Size and perplexity of SmolLM2-135M at each precision, measured on the real model (issue 2, item 6).

Every row is a real checkpoint written to disk: `file` is the bytes of its model.safetensors, `memory` the
bytes of parameters and buffers in memory, `bits/weight` the stored bytes over the original parameter count
(embeddings kept at 16 bits, norms, scales and zero points all included). Perplexity: held-out part of the
Python docs, non-overlapping windows of 1024 tokens over the first 4096 tokens.

    .venv/bin/python benchmarks/size_table.py [--model smollm2-135m] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bitsmith.compare import evaluate_configs  # noqa: E402
from bitsmith.models import load_any, load_text  # noqa: E402
from bitsmith.recipe import Recipe, Scheme  # noqa: E402

CONFIGS = [
    ("FP32", None),
    ("FP16", Recipe(method="fp16")),
    ("BF16", Recipe(method="bf16")),
    ("INT8 per-channel", Recipe(scheme=Scheme(bits=8, group_size=None))),
    ("INT4 g128", Recipe(scheme=Scheme(bits=4, group_size=128))),
    ("INT4 g64", Recipe(scheme=Scheme(bits=4, group_size=64))),
    ("INT4 g64 MSE-clip", Recipe(scheme=Scheme(bits=4, group_size=64), method_args={"mse": True})),
    ("NF4 g64", Recipe(scheme=Scheme(bits=4, group_size=64, grid="nf4"))),
    ("INT3 g64", Recipe(scheme=Scheme(bits=3, group_size=64))),
    ("INT2 g64", Recipe(scheme=Scheme(bits=2, group_size=64))),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args()
    lm = load_any(a.model)
    _, text = load_text(None)
    with tempfile.TemporaryDirectory() as tmp:
        rows = evaluate_configs(lm, CONFIGS, text, seq_len=a.seq_len, max_tokens=a.max_tokens, progress=True,
                                save_root=tmp)
    base = rows[0]
    print("| precision | file MB | vs FP32 file | memory MB | bits/weight | ppl | dPPL |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['file_bytes'] / 1e6:.1f} | {100 * r['file_bytes'] / base['file_bytes']:.1f}% "
              f"| {r['memory_bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | {r['ppl']:.3f} | {r['dppl']:+.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
