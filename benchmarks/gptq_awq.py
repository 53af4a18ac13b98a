"""GPTQ and AWQ against RTN on SmolLM2-135M (issue 3's acceptance numbers).

Held-out default text, perplexity at seq-len 1024 over 4096 tokens; calibration from the calibration part
of the default text (default 128 x 512, bitsmith's defaults). Each quantization runs in its own process so
that its wall time and peak RSS (ru_maxrss, model load included) are its own.

    .venv/bin/python benchmarks/gptq_awq.py                      # fp32, rtn/gptq/awq at 4 and 3 bits, g64
    .venv/bin/python benchmarks/gptq_awq.py --bits 4 --methods gptq --samples 32 --json out.json
    .venv/bin/python benchmarks/gptq_awq.py --bits 4 --methods hqq quanto --no-fp32   # the packages

`hqq` and `quanto` are the `hqq` and `optimum-quanto` packages (bitsmith.baselines, `pip install
'bitsmith[baselines]'`): hqq at the same group size, quanto at its own (the largest <= 128 dividing K).
Both leave lm_head float and round the rest to float16, like bitsmith. Bits per weight count everything
stored (codes, scales, zeros, unquantized tensors at 16 bits, the tied embedding once).

Perplexity of a quantized model is computed with each QuantLinear replaced by an nn.Linear holding its
dequantized weight: the same function as QuantLinear's reference forward (dequantize, then F.linear), 3x
faster because the weight is not re-dequantized on every call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# not this folder: a script here named like a package (kernels.py) would shadow it
sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PACKAGES = ("hqq", "quanto")


def dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Swap each QuantLinear for an nn.Linear with its dequantized weight (in place)."""
    from bitsmith.nn import QuantLinear
    from bitsmith.select import set_submodule

    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.data.float()
            set_submodule(model, name, lin)
    return model


def load(model: str, text: str | None, device: str):
    from bitsmith.models import load_model, load_text

    lm = load_model(model)
    lm.model.to(device)
    return lm, load_text(text)


def run_package(lm, method: str, bits: int, group: int) -> tuple[torch.nn.Module, dict]:
    """The `hqq` / `optimum-quanto` package's quantizer through bitsmith.baselines (same targets)."""
    from bitsmith.baselines import build
    from bitsmith.compare import Config

    params = {"bits": bits, "group_size": group if method == "hqq" else "<=128"}
    model, meta = build(Config(label=method, source=method, params=params), lm, "smollm2-135m")
    return model, {"quant_seconds": round(meta["quantize_seconds"], 1), "bits_per_weight": round(meta["bits_per_weight"], 3),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_one(method: str, bits: int, group: int, samples: int, seq_len: int, args: dict, lm, texts) -> dict:
    """Quantize `lm` (in place) with one method and score it on the held-out text."""
    from bitsmith.apply import quantize_model
    from bitsmith.evaluate import perplexity
    from bitsmith.recipe import Recipe, Scheme
    from bitsmith.size import size_report

    calib_text, eval_text = texts
    device = next(lm.model.parameters()).device
    out: dict = {"method": method, "bits": bits, "group_size": group, "device": str(device)}
    if method in PACKAGES:
        model, meta = run_package(lm, method, bits, group)
        out.update(meta)
        lm.model = model
    elif method != "fp32":
        recipe = Recipe(method=method, scheme=Scheme(bits=bits, group_size=group), method_args=args)
        calib = {}
        if method != "rtn":
            calib = {"tokenizer": lm.tokenizer, "calib_text": calib_text, "n_samples": samples, "seq_len": seq_len}
            out.update(calib_samples=samples, calib_seq_len=seq_len, method_args=args)
        _sync(device)
        t0 = time.perf_counter()
        report = quantize_model(lm.model, recipe, **calib)
        _sync(device)
        out["quant_seconds"] = round(time.perf_counter() - t0, 1)
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        errs = [(r["out_rel_err_before"], r["out_rel_err"]) for r in report if r.get("out_rel_err") is not None]
        if errs:
            out["mean_out_rel_err_rtn"] = round(sum(a for a, _ in errs) / len(errs), 5)
            out["mean_out_rel_err"] = round(sum(b for _, b in errs) / len(errs), 5)
            out["fallbacks"] = sum(1 for r in report if r.get("fallback"))
        out["bits_per_weight"] = round(size_report(lm.model)["bits_per_weight"], 3)
        dequantized_copy(lm.model)
    t0 = time.perf_counter()
    out["ppl"] = perplexity(lm.model, lm.tokenizer, eval_text, seq_len=1024, max_tokens=4096)["ppl"]
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--gptq-args", default="{}", help="GPTQ method_args as JSON, e.g. '{\"act_order\": true}'")
    p.add_argument("--awq-args", default="{}", help="AWQ method_args as JSON")
    p.add_argument("--no-fp32", action="store_true", help="skip the unquantized reference (20.00)")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--model", default="smollm2-135m", help="bundled name or .gguf / HF directory")
    p.add_argument("--text", help="UTF-8 text file split like the default text (default: the bundled text)")
    p.add_argument("--device", help="run every job in this one process on this device (e.g. cuda); "
                                    "default: each job in its own CPU process, for its own time and peak RSS")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "BITS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))      # the acceptance is on 2 CPU cores
    if a.one:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")   # block progress
        logging.getLogger("httpx").setLevel(logging.WARNING)
        args = json.loads({"gptq": a.gptq_args, "awq": a.awq_args}.get(a.one[0], "{}"))
        res = run_one(a.one[0], int(a.one[1]), a.group_size, a.samples, a.seq_len, args, *load(a.model, a.text, "cpu"))
        print("RESULT " + json.dumps(res), flush=True)
        return
    jobs = [] if a.no_fp32 else [("fp32", 16)]
    jobs += [(m, b) for b in a.bits for m in a.methods]
    results = []
    if a.device:
        import copy
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        lm, texts = load(a.model, a.text, a.device)
        base = copy.deepcopy(lm.model)
        for method, bits in jobs:
            lm.model = copy.deepcopy(base)
            args = json.loads({"gptq": a.gptq_args, "awq": a.awq_args}.get(method, "{}"))
            res = run_one(method, bits, a.group_size, a.samples, a.seq_len, args, lm, texts)
            results.append(res)
            print(json.dumps(res), flush=True)
            if a.json:                 # after every job: a run cut short keeps what it measured
                with open(a.json, "w", encoding="utf-8") as f:
                    json.dump({"results": results}, f, indent=2)
        jobs = []
    for method, bits in jobs:
        cmd = [sys.executable, __file__, "--one", method, str(bits), "--group-size", str(a.group_size),
               "--samples", str(a.samples), "--seq-len", str(a.seq_len), "--gptq-args", a.gptq_args,
               "--awq-args", a.awq_args, "--model", a.model] + (["--text", a.text] if a.text else [])
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True)     # stderr: progress log
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{method} w{bits} failed (exit {proc.returncode}); its log is above", file=sys.stderr)
            continue
        res = json.loads(line[len("RESULT "):])
        results.append(res)
        print(json.dumps(res), flush=True)
    fp = next((r["ppl"] for r in results if r["method"] == "fp32"), 20.0)
    print("\n| method | bits | g | ppl | dPPL | dPPL / RTN | ppl / RTN | bits/weight | quant s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rtn = next((x["ppl"] for x in results if x["method"] == "rtn" and x["bits"] == r["bits"]), None)
        d = r["ppl"] - fp
        rel = f"{d / (rtn - fp):.3f}" if rtn and r["method"] != "fp32" else ""
        ratio = f"{r['ppl'] / rtn:.3f}" if rtn and r["method"] != "fp32" else ""
        bits = "-" if r["method"] == "fp32" else r["bits"]
        print(f"| {r['method']} | {bits} | {r['group_size']} | {r['ppl']:.3f} | {d:+.3f} | {rel} | {ratio} | "
              f"{r.get('bits_per_weight', 16)} | {r.get('quant_seconds', '')} | {r.get('peak_rss_mb', '')} |")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"fp32_ppl": fp, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
