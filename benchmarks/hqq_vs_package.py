"""bitsmith's HQQ against the reference `hqq` package (mobiusml), side by side on SmolLM2-135M (issue 5).

Both quantize the same layers (every decoder linear; the tied lm_head and embeddings stay float) at 4 bits,
group 64, from the same fp32 model, and are scored on the same held-out text (seq-len 1024, 4096 tokens).
The package runs as its `HQQLinear` with its default `BaseQuantizeConfig(nbits=4, group_size=64)` on CPU
with compute dtype float32 (its scale and zero kept in fp32, its best case); bitsmith stores scale and zero
in float16 and keeps everything else at fp32 (keep_dtype None) so only the quantizer differs. Quantization
wall time is measured on the threads given (--threads, default 2), next to the process CPU time (all threads
summed), which a busy shared machine inflates far less than the wall time; check `uptime` alongside.

Needs `pip install hqq` (benchmark only; the library and its tests do not).

    .venv/bin/python benchmarks/hqq_vs_package.py [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bitsmith  # noqa: E402
from bitsmith import Recipe, Scheme  # noqa: E402
from bitsmith.evaluate import perplexity  # noqa: E402
from bitsmith.models import load_model, load_text  # noqa: E402
from bitsmith.select import select_modules, set_submodule  # noqa: E402


def hqq_package(model: nn.Module, bits: int, group: int) -> float:
    """Swap every selected linear for the package's HQQLinear; returns wall seconds."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group)
    t0 = time.perf_counter()
    for name, mod in select_modules(model, ("*",), ("lm_head",)):
        set_submodule(model, name, HQQLinear(mod, cfg, compute_dtype=torch.float32, device="cpu"))
    return time.perf_counter() - t0


def ours(model: nn.Module, bits: int, group: int, method: str, **args) -> float:
    t0 = time.perf_counter()
    bitsmith.quantize(model, Recipe(method=method, scheme=Scheme(bits=bits, group_size=group), keep_dtype=None,
                                    method_args=args))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--only", nargs="+", help="run only the rows whose label starts with one of these")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m")
    _, text = load_text(None)

    def ppl(m: nn.Module) -> float:
        return perplexity(m, lm.tokenizer, text, seq_len=1024, max_tokens=4096)["ppl"]

    rows = [{"config": "fp32", "seconds": 0.0, "cpu_seconds": 0.0, "ppl": ppl(lm.model)}]
    runs = [("hqq package 0.2.8 (HQQLinear, fp32 meta)", lambda m: hqq_package(m, a.bits, a.group_size)),
            ("bitsmith hqq", lambda m: ours(m, a.bits, a.group_size, "hqq")),
            ("bitsmith hqq optimize_scale", lambda m: ours(m, a.bits, a.group_size, "hqq", optimize_scale=True)),
            ("bitsmith rtn (min-max)", lambda m: ours(m, a.bits, a.group_size, "rtn"))]
    for label, run in runs:
        if a.only and not any(label.startswith(o) for o in a.only):
            continue
        m = copy.deepcopy(lm.model)
        cpu0 = time.process_time()
        seconds = run(m)
        cpu = time.process_time() - cpu0
        rows.append({"config": label, "seconds": seconds, "cpu_seconds": cpu, "ppl": ppl(m),
                     "load_avg_1min": os.getloadavg()[0]})
        print(f"{label}: {seconds:.1f} s wall, {cpu:.1f} s CPU, ppl {rows[-1]['ppl']:.4f}", flush=True)
    ref = next((r["ppl"] for r in rows if r["config"].startswith("hqq package")), rows[0]["ppl"])
    print(f"\nSmolLM2-135M, {a.bits}-bit g{a.group_size}, {a.threads} thread(s); held-out text, seq 1024, 4096 tokens")
    print("| quantizer | quantize wall s | quantize CPU s | ppl | vs hqq package |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / ref - 1):+.2f}% |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
