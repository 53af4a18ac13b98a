# ruff: noqa: B023  (each lambda runs inside bench() in the iteration that made it)
"""Device sweep behind the README's M = 1 and M = 16..64 launch rules (this session): on the five issue shapes,
bf16 vs the old one-launch GEMV (gemv1) vs the half-conversion GEMV (gemv1h) over launch configs at M = 1,
4 and 8 bits; the tensor-core GEMM at M = 16 / 32 / 64 with 4 vs 8 warps; W8A8 row-quantization codes
against reference.py over many random rows. Every timed config is first checked against a float32
dequantized matmul (relative error < 1e-2). Writes $OUT/sweep.json.

    python benchmarks/results/kernels-h200/sweep_m1.py [shapes] [budget_s_per_cell]
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernels as KB  # benchmarks/kernels.py

from bitsmith import kernels
from bitsmith.kernels import reference
from bitsmith.kernels import triton_w8a8 as W
from bitsmith.kernels import triton_gemv1 as T1, triton_gemm as TG
from bitsmith.primitives import dequantize_weight

OUT = os.environ.get("OUT", "/tmp")
shapes = [tuple(map(int, s.split("x"))) for s in (sys.argv[1] if len(sys.argv) > 1 else
          "4096x4096,14336x4096,4096x14336,28672x8192,8192x28672").split(",")]
budget = float(sys.argv[2]) if len(sys.argv) > 2 else 25.0
res = {"copy_GBps": KB.copy_rate() / 1e9, "dev": torch.cuda.get_device_name(), "cells": [], "quant": []}
print(json.dumps(res), flush=True)


def err(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


def save():
    Path(OUT, "sweep.json").write_text(json.dumps(res, indent=1))


# W8A8 row quantization: kernel codes vs reference codes on fresh random rows (the flaky FP8 tests)
for fp8 in (True, False):
    bad_rows = rows = 0
    for trial in range(40):
        x = torch.randn(64, 4096, device="cuda").half() * (1 + trial)
        q, s = W.quantize_rows(x, fp8=fp8)
        rq, rs = (reference.quantize_rows_fp8 if fp8 else reference.quantize_rows_int8)(x)
        same = (q.float() == rq.float()).all(1) & (s == rs.view(-1))
        bad_rows += int((~same).sum())
        rows += x.shape[0]
    res["quant"].append({"fp8": fp8, "rows": rows, "rows_with_any_code_or_scale_off": bad_rows})
print(json.dumps(res["quant"]), flush=True)


def h_configs(n, k, bits):
    base = kernels.gemv1h_config(n, k, bits)
    out = [base]
    for bn, nw in ((256, 4), (128, 4), (64, 1), (128, 2), (256, 8), (512, 8)):
        for f in (1, 2, 0.5):
            sk = max(1, min(16, int(base["split_k"] * f)))
            c = {"block_n": bn, "block_w": base["block_w"], "split_k": sk, "num_warps": nw}
            if c not in out and -(-n // bn) >= 8:
                out.append(c)
    return out


for n, k in shapes:
    w, w4, w8, *_ = KB.make_layers(n, k)
    ws = [w.clone() for _ in range(KB.copies_for(n * k * 2))]
    for bits, mod in ((4, w4), (8, w8)):
        P = KB.rotated_packs(mod)
        wref = dequantize_weight(mod.qweight(), torch.float32)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ wref.t()
        cell = {"N": n, "K": k, "M": 1, "bits": bits, "bf16": KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])}
        c1 = kernels.gemv1_config(n, k, bits)
        cell["gemv1"] = KB.bench([lambda q=q: T1.gemv1(x, q, None, **c1) for q in P])
        cell["gemv1_err"] = err(T1.gemv1(x, P[0], None, **c1), ref)
        best, t0 = None, time.time()
        for i, cfg in enumerate(h_configs(n, k, bits)):
            if time.time() - t0 > budget:
                break
            try:
                e = err(T1.gemv1h(x, P[0], None, **cfg), ref)
                assert e < 1e-2, e
                us = KB.bench([lambda q=q: T1.gemv1h(x, q, None, **cfg) for q in P])
            except Exception as ex:  # noqa: BLE001 - a failing config is a result
                print("cfg fail", cfg, str(ex)[:300], flush=True)
                continue
            if i == 0:
                cell["gemv1h_default"], cell["gemv1h_default_err"] = us, e
            cell.setdefault("h_all", []).append([us, cfg])
            if best is None or us < best[0]:
                best = (us, cfg, e)
        if best:
            cell["gemv1h_best"], cell["gemv1h_best_cfg"], cell["gemv1h_best_err"] = best
        res["cells"].append(cell)
        print(json.dumps({kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in cell.items() if kk != "h_all"}), flush=True)
        save()
    # GEMM, 4 bits, M = 16 / 32 / 64: the rule's launch vs 8 warps
    P = KB.rotated_packs(w4)
    wref = dequantize_weight(w4.qweight(), torch.float32)
    for m in (16, 32, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ wref.t()
        cell = {"N": n, "K": k, "M": m, "bits": 4, "bf16": KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])}
        d = kernels.gemm_config(m, n, k, 4)
        cands = {"default": d}
        if m <= 16:
            cands["bn128_w8"] = {**d, "block_n": 128, "num_warps": 8}
            cands["bn128_w4"] = {**d, "block_n": 128, "num_warps": 4}
        else:
            cands["w8"] = {**d, "num_warps": 8}
            cands["w8_bn256"] = {**d, "num_warps": 8, "block_n": 256}
            cands["w8_split2x"] = {**d, "num_warps": 8, "split_k": 2 * d["split_k"]}
        for name, cfg in cands.items():
            try:
                e = err(TG.gemm(x, P[0], None, **cfg), ref)
                assert e < 1e-2, e
                cell[name] = KB.bench([lambda q=q: TG.gemm(x, q, None, **cfg) for q in P])
                cell[name + "_cfg"] = cfg
            except Exception as ex:  # noqa: BLE001
                cell[name + "_error"] = str(ex)[:200]
        if m >= 16:
            cell["dequant"] = KB.bench([lambda q=q: TG.dequant_matmul(x, q, None) for q in P])
        res["cells"].append(cell)
        print(json.dumps({kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in cell.items() if not kk.endswith("_cfg")}), flush=True)
        save()
    del w, w4, w8, ws, P
    torch.cuda.empty_cache()
save()
print("\nSUMMARY")
for c in res["cells"]:
    b = c["bf16"]
    items = [f"{kk}={c[kk]:.1f}({b / c[kk]:.2f}x)" for kk in c if isinstance(c[kk], float) and kk != "bf16" and not kk.endswith("err")]
    print(f"{c['N']}x{c['K']} M={c['M']} b{c['bits']} bf16={b:.1f} " + " ".join(items), c.get("gemv1h_best_cfg", ""))
