"""W8A8 versus FP32 speed on the CPU: one 4096x4096 linear at batch 1, and MiniLM-L6's forward at batch 8,
sequence 128. Both sides run in the same process, alternating, best of `--repeats` rounds (so a noisy
machine hurts both alike); `uptime`'s load average is printed next to the numbers.

W8A8 rows: dynamic per-token activations (`dyn`) and static per-tensor (`static`), each with full int8
weights (exact in two fbgemm passes on CPUs without VNNI, see kernels/cpu_w8a8.py) and with
`reduce_range` weights in [-64, 64] (one pass), and static with SmoothQuant `auto` (the accurate static
variant: run-time smoothing, W8A8ScaledLinear). The issue's targets: linear >= 2x, MiniLM >= 1.5x FP32.

    .venv/bin/python -P benchmarks/w8a8_speed.py --threads 2 [--skip-minilm] [--json out.json]
    .venv/bin/python -P benchmarks/w8a8_speed.py --threads 2 --profile "w8a8 static reduce_range"

`--profile VARIANT` instead runs torch.profiler over 3 MiniLM forwards of that variant (or fp32) and prints
where the time goes, by operator.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import time

import torch
from torch import nn

import bitsmith
from bitsmith import Recipe, Scheme


def best_ms(fns: dict, repeats: int, inner: int) -> dict[str, float]:
    """{name: best mean ms per call}; the candidates alternate inside every round."""
    best = {k: float("inf") for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t0) / inner * 1e3)
    return best


def recipe(**args) -> Recipe:
    return Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True), ignore=(), method_args=args)


VARIANTS = {"w8a8 dyn": {"dynamic": True}, "w8a8 static": {},
            "w8a8 dyn reduce_range": {"dynamic": True, "reduce_range": True},
            "w8a8 static reduce_range": {"reduce_range": True},
            "w8a8 static sq auto": {"smoothquant": "auto"}}      # run-time smoothing where no fold (all of BERT)


def linear_rows(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    x = torch.randn(1, 4096)
    fns = {"fp32": lambda: fp(x)}
    for name, args in VARIANTS.items():
        q = copy.deepcopy(fp)
        bitsmith.quantize(q, recipe(**args), calib_ids=torch.randn(64, 4096))
        fns[name] = functools.partial(q, x)
    return best_ms(fns, repeats, 20)


def minilm_forwards(variants: dict) -> dict:
    """{name: a zero-argument MiniLM forward at batch 8, seq 128}: fp32 and each W8A8 variant given."""
    from bitsmith.models import load_model, load_text

    lm = load_model("minilm-l6")
    calib, held = load_text(None)
    enc = lm.tokenizer([held[i * 700:(i + 1) * 700] for i in range(8)], truncation=True, max_length=128,
                       padding="max_length", return_tensors="pt")
    fns = {"fp32": functools.partial(lm.model, **enc)}
    for name, args in variants.items():
        q = copy.deepcopy(lm.model)
        bitsmith.quantize(q, recipe(**args), tokenizer=lm.tokenizer, calib_text=calib, n_samples=16, seq_len=128)
        fns[name] = functools.partial(q, **enc)
    return fns


def minilm_rows(repeats: int) -> dict[str, float]:
    return best_ms(minilm_forwards(VARIANTS), repeats, 3)


def profile(variant: str) -> str:
    """torch.profiler's per-operator table (self CPU time) over 3 forwards of one MiniLM variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    f = minilm_forwards({} if variant == "fp32" else {variant: VARIANTS[variant]})[variant]
    with torch.inference_mode():
        f()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                f()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--profile", choices=["fp32", *VARIANTS], help="profile one MiniLM variant instead")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.profile:
        print(profile(a.profile))
        print(f"load average {os.getloadavg()[0]:.1f} ({a.threads} threads)")
        return
    out = {"threads": a.threads, "load_before": os.getloadavg()[0], "linear_4096_m1_ms": linear_rows(a.repeats)}
    if not a.skip_minilm:
        out["minilm_b8_s128_ms"] = minilm_rows(a.repeats)
    out["load_after"] = os.getloadavg()[0]
    for key in ("linear_4096_m1_ms", "minilm_b8_s128_ms"):
        if key in out:
            fp = out[key]["fp32"]
            for name, ms in out[key].items():
                print(f"{key:20s} {name:26s} {ms:9.2f} ms  {fp / ms:5.2f}x fp32")
    print(f"load average {out['load_before']:.1f} before, {out['load_after']:.1f} after ({a.threads} threads)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
