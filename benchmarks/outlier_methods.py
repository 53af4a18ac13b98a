"""Issue 5's SmolLM2-135M accuracy table: NF4 (+ double quant), LLM.int8(), incoherence and `quip`
(incoherence + GPTQ) against RTN and GPTQ alone, at 8, 4, 3 and 2 bits, and HQQ at 3 bits.

Held-out default text, perplexity at seq-len 1024 over 4096 tokens (4 windows), every decoder linear
quantized (lm_head and the tied embedding stay float16, as in every bitsmith recipe). Calibrated methods
(gptq, quip) use 128 windows of 512 tokens of the default calibration text unless --calib-samples says
otherwise, and the calibration engine's solver defaults (gptq.scheme_defaults) unless a row names others. The
quantized models run through their real modules (QuantLinear / Int8MixedLinear / HadamardLinear), so
LLM.int8()'s int8 activations and the run-time Hadamards are part of what is measured. Bits per weight
count everything a checkpoint of the quantized linears stores (codes, scales, zeros, signs, thresholds).
HQQ against the `hqq` package is benchmarks/hqq_vs_package.py.

    .venv/bin/python benchmarks/outlier_methods.py --json out.json            # every row (CPU: ~1 h)
    .venv/bin/python benchmarks/outlier_methods.py --only gptq-w3g64 quip-w3g64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import bitsmith  # noqa: E402
from bitsmith import Recipe, Scheme, methods  # noqa: E402
from bitsmith.evaluate import perplexity  # noqa: E402
from bitsmith.models import load_model, load_text  # noqa: E402
from bitsmith.size import size_report  # noqa: E402

G64 = {b: Scheme(bits=b, group_size=64) for b in (2, 3, 4)}
INT8 = Scheme(bits=8, group_size=None, symmetric=True)
PLAIN = {"act_order": False, "mse": False}     # columns in order, min-max groups (IST-DASLab/gptq's defaults)
ROWS: dict[str, tuple] = {      # label: (method, scheme[, method_args])
    "fp32": ("none", None),
    "llm_int8": ("llm_int8", INT8),                       # threshold 6.0, the paper's; zeropoint activations
    "llm_int8-absmax": ("llm_int8", INT8, {"activations": "absmax"}),   # bitsandbytes' Linear8bitLt scheme
    "llm_int8-t3": ("llm_int8", INT8, {"threshold": 3.0}),
    "rtn-w8pc": ("rtn", Scheme(bits=8, group_size=None)),
    "nf4-g64-dq": ("nf4", G64[4]),                                   # w^2-weighted scale search (default)
    "nf4-g64-dq-absmax": ("nf4", G64[4], {"scale_search": False}),   # absmax scales, as bitsandbytes
    "nf4-g64-dq-search-unweighted": ("nf4", G64[4], {"search_power": 0.0}),
    "rtn-w4g64": ("rtn", G64[4]),
    "gptq-w3g64": ("gptq", G64[3]),                                  # both: the engine's <= 3-bit defaults,
    "quip-w3g64": ("quip", G64[3]),                                  # act-order + MSE group parameters
    "gptq-w2g64": ("gptq", G64[2]),
    "quip-w2g64": ("quip", G64[2]),
    "gptq-plain-w2g64": ("gptq", G64[2], PLAIN),                     # the reference GPTQ's settings
    "quip-plain-w2g64": ("quip", G64[2], PLAIN),
    "quip-clip-w3g64": ("quip", G64[3], {"act_order": False, "clip": True}),   # quip's default before 2026-12
    "rtn-w3g64": ("rtn", G64[3]),
    "hqq-w3g64": ("hqq", G64[3]),                      # integer zero + fitted scale (the <= 3-bit default)
    "hqq-w3g64-fraczero": ("hqq", G64[3], {"integer_zero": False}),  # HQQ's fractional zero, as the package
    "incoherence-w3g64": ("incoherence", G64[3]),
    "rtn-w2g64": ("rtn", G64[2]),
    "incoherence-w2g64": ("incoherence", G64[2]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(ROWS), help="rows to run (default all, in table order)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--json", help="append one JSON line per row to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m")
    calib_text, text = load_text(None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for label in a.only or list(ROWS):
        method, scheme, *args = ROWS[label]
        args = args[0] if args else {}
        m = copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        bpw = None
        if scheme is not None:
            calib = {}
            if methods.get(method).NEEDS:
                calib = {"tokenizer": lm.tokenizer, "calib_text": calib_text, "n_samples": a.calib_samples,
                         "seq_len": 512}
            bitsmith.quantize(m, Recipe(method=method, scheme=scheme, method_args=args), **calib)
            bpw = size_report(m)["quantized_bpw"]
        seconds = time.perf_counter() - t0
        with torch.inference_mode():
            ppl = perplexity(m, lm.tokenizer, text, seq_len=1024, max_tokens=4096)["ppl"]
        row = {"row": label, "method": method, "method_args": args,
               "scheme": None if scheme is None else scheme.label(), "ppl": ppl,
               "quantized_bpw": bpw, "quantize_s": round(seconds, 1), "threads": a.threads,
               "calib_samples": a.calib_samples, "commit": commit}
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
