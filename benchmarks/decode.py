"""Decode speed of quantized models through QuantLinear's kernel dispatch (issue 8).

--cpu: SmolLM2-135M on the CPU (default 2 threads), batch 1, greedy decode with the KV cache (bitsmith's
evaluate.latency: best of 2 runs of 32 tokens after a 64-token prompt): FP32 vs W8 (int8 per-channel,
symmetric) vs W4 (int4 g64), through auto dispatch (cpu_fused where a C++ compiler is found), each quantized
model also with BITSMITH_KERNELS=reference (dequantize every call, the path before issue 8). --profile adds
torch.profiler's top operators for one decode step of each model.

--gpu: a Llama-3-8B-shaped stack (32 blocks, d 4096, MLP 14336, GQA 32/8 heads, vocab 128256) with random
weights, one decode step captured in a CUDA graph, batch 1 and 16, bf16 vs bitsmith W4 g128 vs W8.

    OMP_NUM_THREADS=2 python benchmarks/decode.py --cpu [--threads 2] [--profile] [--json out.json]
    python -P benchmarks/decode.py --gpu [--variants plain,fused+head+glue] [--kernels auto,triton_gemv1h]
        [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# benchmarks/kernels.py would shadow the optional `kernels` package transformers probes for: run from the root
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from bitsmith import kernels  # noqa: E402
from bitsmith.recipe import Recipe, Scheme  # noqa: E402

CPU_CONFIGS = [("FP32", None), ("W8 per-channel sym", Scheme(bits=8, group_size=None, symmetric=True)),
               ("W4 g64", Scheme(bits=4, group_size=64))]


def cpu(threads: int, profile: bool) -> list[dict]:
    import copy

    from bitsmith.apply import quantize_model
    from bitsmith.evaluate import latency
    from bitsmith.models import load_model, load_text

    torch.set_num_threads(threads)
    lm = load_model("smollm2-135m")
    _, text = load_text(None)
    prompt = lm.tokenizer(text, return_tensors="pt").input_ids[:, :64]
    rows = []
    for label, scheme in CPU_CONFIGS:
        model = copy.deepcopy(lm.model)
        if scheme is not None:
            quantize_model(model, Recipe(method="rtn", scheme=scheme))
        for pol in (("auto", "reference") if scheme is not None else ("auto",)):
            kernels.set_policy(pol)
            try:
                r = latency(model, prompt, new_tokens=32, repeats=2)
                picked = {type(m).__name__: kernels.select(m, torch.zeros(1, m.k)) for m in model.modules()
                          if hasattr(m, "qcodes")}
                row = {"model": label, "policy": pol, "kernel": sorted(set(map(str, picked.values()))) or ["-"],
                       "decode_tokens_per_s": r["decode_tokens_per_s"], "prefill_tokens_per_s": r["prefill_tokens_per_s"]}
                if profile:
                    row["profile"] = profile_step(model, prompt)
            finally:
                kernels.set_policy(None)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    return rows


def profile_step(model, prompt) -> list[tuple[str, float]]:
    """Top 6 operators by self CPU time over 4 decode steps: (name, ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(4):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    return [(e.key, round(e.self_cpu_time_total / 1e3 / 4, 3)) for e in ev]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--variants", default="plain", help="GPU: comma-separated model variants, e.g. "
                    "plain,fused+head+glue (parts: plain, fused, head, glue; see decode_gpu.py)")
    ap.add_argument("--kernels", default="auto", help="GPU: comma-separated kernel policies for the "
                    "quantized linears, e.g. auto,triton_gemv1h (a forced M = 1 kernel runs at batch 1 only)")
    ap.add_argument("--models", default="bf16,W4 g128,W8 per-channel")
    ap.add_argument("--batches", default="1,16")
    a = ap.parse_args()
    rows = []
    if a.cpu:
        rows += cpu(a.threads, a.profile)
    if a.gpu:
        from benchmarks.decode_gpu import gpu      # noqa: PLC0415 - CUDA-only, kept apart
        rows += gpu(variants=a.variants.split(","), kernel_policies=a.kernels.split(","),
                    models=a.models.split(","), batches=[int(v) for v in a.batches.split(",")],
                    profile=a.profile)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    base = {(r["model"], r.get("batch", 1), r.get("variant")): r for r in rows if r.get("policy") == "auto"}
    print("\n| model | variant | batch | kernels | decode tok/s | x FP32 / bf16 |\n|---|---|---|---|---|---|")
    for r in rows:
        b, v = r.get("batch", 1), r.get("variant")
        fp = base.get(("FP32", b, v)) or base.get(("bf16", b, v))
        sp = r["decode_tokens_per_s"] / fp["decode_tokens_per_s"] if fp else float("nan")
        print(f"| {r['model']} | {v or '-'} | {b} | {', '.join(r['kernel'])} ({r['policy']}) | "
              f"{r['decode_tokens_per_s']:.2f} | {sp:.2f}x |")


if __name__ == "__main__":
    main()
