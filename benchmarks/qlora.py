"""QLoRA on SmolLM2-135M: NF4 base (double quantization, 4.127 bits per quantized weight), LoRA adapters on
every decoder linear, a short fine-tune on the calibration part of the default text, perplexity on the
held-out part (seq-len 1024, 4096 tokens) before and after; then the adapters merged and re-quantized to NF4.

    python -P benchmarks/qlora.py [--steps 40 --rank 16 --lr 1e-3 --seq-len 256 --batch-size 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bitsmith import Recipe, Scheme, quantize  # noqa: E402
from bitsmith.evaluate import PeakMemory, perplexity  # noqa: E402
from bitsmith.lora import LoraConfig, add_lora, finetune, merge, trainable_count  # noqa: E402
from bitsmith.models import calibration_samples, load_model, load_text  # noqa: E402
from bitsmith.size import size_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fp32", action="store_true", help="skip the unquantized perplexity (20.001 on the default text)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    lm = load_model("smollm2-135m")
    calib_text, eval_text = load_text(None)
    row: dict = {"steps": a.steps, "rank": a.rank, "alpha": a.alpha, "lr": a.lr, "seq_len": a.seq_len,
                 "batch_size": a.batch_size, "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}
    ppl = lambda: perplexity(lm.model, lm.tokenizer, eval_text, seq_len=1024, max_tokens=a.eval_tokens)["ppl"]  # noqa: E731
    if not a.no_fp32:
        with torch.no_grad():
            row["fp32_ppl"] = ppl()
    quantize(lm.model, Recipe(method="nf4", scheme=Scheme(bits=4, group_size=64, grid="nf4")))
    size = size_report(lm.model)
    row["base_quantized_bpw"] = size.get("quantized_bpw")
    row["base_memory_mb"] = round(size["memory_bytes"] / 2**20, 1)   # packed linears + 16-bit rest
    with torch.no_grad():
        row["nf4_ppl"] = ppl()
    add_lora(lm.model, LoraConfig(rank=a.rank, alpha=a.alpha, seed=a.seed))
    row["trainable_params"] = trainable_count(lm.model)
    windows = calibration_samples(lm.tokenizer, calib_text, n_samples=a.steps * a.batch_size, seq_len=a.seq_len,
                                  seed=a.seed)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        losses = finetune(lm.model, windows, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                          progress=True)
    row["train_seconds"] = round(time.perf_counter() - t0, 1)
    row["train_peak_rss_mb"] = round(mem.peak / 2**20) if getattr(mem, "peak", None) else None
    row["loss_first"], row["loss_last"] = losses[0], sum(losses[-5:]) / len(losses[-5:])
    with torch.no_grad():
        row["qlora_ppl"] = ppl()
        merge(lm.model)
        row["merged_nf4_ppl"] = ppl()
    row["merged_quantized_bpw"] = size_report(lm.model).get("quantized_bpw")
    print(json.dumps(row, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
