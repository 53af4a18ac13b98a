# ruff: noqa: B023  (each lambda runs inside bench() in the iteration that made it)
"""Session 9 sweep: the GEMM with its K steps in the MMA fragments' order (`kperm`), against the current
rule, bf16 in the same run, 4 bits g128 on the issue's five shapes.
  M = 2..64:  the rule; the rule with kperm=1 (x permuted per tile in the kernel), with scale_after flipped,
              with half and twice the split; the rule with kperm=2 (x permuted once per call).
  M = 256:    what dispatch runs; the TMA GEMM at 256 x 128 tiles with kperm 0 / 1 / 2; dequantize + cuBLAS.
  M = 2048:   dequantize + cuBLAS; the TMA GEMM at 256 x 128 and 128 x 256 with kperm=2.
FINE=1 (call 2), around call 1's winners:
  M <= 16:    kperm=1 through the copy engine, split (half / rule / twice), scale_after, 64 or 128 weight
              rows, 3 or 4 stages.
  M = 17-64:  kperm 0 / 1 / 2, splits 1-8, scale_after.
  M = 256:    kperm=2 at 128 x 128 and 128 x 64 tiles, 3 / 4 stages, split 1 / 2; dequantize + cuBLAS.
Each config is first checked against a float32 dequantized matmul (relative error < 1e-2); a failing or
wrong config is recorded, not timed. Writes $OUT/sweep-kperm.json as it goes; stops starting cells after
BUDGET seconds.

    BUDGET=300 python benchmarks/results/kernels-h200/sweep_kperm.py
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
from bitsmith.kernels import triton_gemm as TG
from bitsmith.primitives import dequantize_weight

OUT = os.environ.get("OUT", "/tmp")
BUDGET = float(os.environ.get("BUDGET", "300"))
SHAPES = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("SHAPES", "").split(",") if s] or KB.SHAPES
MS = [int(v) for v in os.environ.get("MS", "2,4,16,64,256,2048").split(",")]
t_start = time.time()
res = {"dev": torch.cuda.get_device_name(), "cells": []}


def check_and_time(cell, name, fn_of_pack, packs, ref):
    try:
        e = float((fn_of_pack(packs[0]).float() - ref).norm() / ref.norm())
        if not e < 1e-2:
            cell[name + "_error"] = f"rel err {e:.3g}"
            return
        cell[name] = KB.bench([lambda q=q: fn_of_pack(q) for q in packs])
    except Exception as ex:  # noqa: BLE001 - a failing config is a result
        cell[name + "_error"] = str(ex)[:200]


def gemm_cells(n, k, mod, m):
    packs = KB.rotated_packs(mod)
    wref = dequantize_weight(mod.qweight(), torch.float32)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ wref.t()
    cell = {"N": n, "K": k, "M": m, "bits": 4}
    d = kernels.gemm_config(m, n, k, 4)
    cell["rule"] = d
    run = lambda cfg: (lambda q: TG.gemm(x, q, None, **cfg))   # noqa: E731
    if os.environ.get("FINE"):
        return fine_cells(cell, d, run, packs, ref, m, x)
    if m <= 64:
        check_and_time(cell, "rule", run(d), packs, ref)
        check_and_time(cell, "k1", run({**d, "kperm": 1}), packs, ref)
        check_and_time(cell, "k2", run({**d, "kperm": 2}), packs, ref)
        if m > 2:
            sa = not d.get("scale_after", False)
            check_and_time(cell, "k1_sa" if sa else "k1_nosa", run({**d, "kperm": 1, "scale_after": sa}), packs, ref)
            for sk in sorted({max(1, d["split_k"] // 2), 2 * d["split_k"]} - {d["split_k"]}):
                cfg = {**d, "kperm": 1, "split_k": sk}
                if sk > d["split_k"]:
                    cfg.pop("scale_after", None)          # more splits: scale_after lost there (session 8)
                check_and_time(cell, f"k1_sk{sk}", run(cfg), packs, ref)
            if not d["tma"]:
                check_and_time(cell, "k1_tma", run({**d, "kperm": 1, "tma": True}), packs, ref)
        return cell
    check_and_time(cell, "dequant", lambda q: TG.dequant_matmul(x, q, None), packs, ref)
    big = {"block_m": 256, "block_n": 128, "split_k": 1, "num_warps": 8, "num_stages": 3, "block_w": 16,
           "tma": True}
    if m <= 256:
        for kp in (0, 1, 2):
            check_and_time(cell, f"t256_k{kp}", run({**big, "kperm": kp}), packs, ref)
        check_and_time(cell, "t128_k2", run({**big, "block_m": 128, "kperm": 2}), packs, ref)
    else:
        check_and_time(cell, "t256_k2", run({**big, "kperm": 2}), packs, ref)
        check_and_time(cell, "t128x256_k2", run({**big, "block_m": 128, "block_n": 256, "kperm": 2}), packs, ref)
    return cell


def fine_cells(cell, d, run, packs, ref, m, x):
    check_and_time(cell, "rule", run(d), packs, ref)
    if m <= 16:
        for sk in sorted({max(1, d["split_k"] // 2), d["split_k"], 2 * d["split_k"]}):
            for bn in (64, 128):
                for st in (3, 4):
                    for sa in (False, True):
                        cfg = {**d, "kperm": 1, "tma": True, "split_k": sk, "block_n": bn, "num_stages": st,
                               "scale_after": sa}
                        check_and_time(cell, f"k1_sk{sk}_bn{bn}_s{st}" + ("_sa" if sa else ""), run(cfg), packs, ref)
    elif m <= 64:
        for kp in (0, 1, 2):
            for sk in (1, 2, 4, 8):
                for sa in (False, True):
                    cfg = {**d, "kperm": kp, "split_k": sk, "scale_after": sa}
                    check_and_time(cell, f"k{kp}_sk{sk}" + ("_sa" if sa else ""), run(cfg), packs, ref)
    else:
        check_and_time(cell, "dequant", lambda q: TG.dequant_matmul(x, q, None), packs, ref)
        for bm, bn in ((128, 128), (128, 64), (64, 128)):
            for st in (3, 4):
                for sk in (1, 2):
                    cfg = {"block_m": bm, "block_n": bn, "split_k": sk, "num_warps": 8 if bn == 128 else 4,
                           "num_stages": st, "block_w": 16, "tma": True, "kperm": 2}
                    check_and_time(cell, f"k2_bm{bm}_bn{bn}_s{st}_sk{sk}", run(cfg), packs, ref)
    return cell


for n, k in SHAPES:
    if time.time() - t_start > BUDGET:
        break
    w, w4, *_ = KB.make_layers(n, k)
    ws = [w.clone() for _ in range(KB.copies_for(n * k * 2))]
    for m in MS:
        if time.time() - t_start > BUDGET:
            break
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cell = gemm_cells(n, k, w4, m)
        cell["bf16"] = KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])
        timed = {kk: v for kk, v in cell.items() if isinstance(v, float) and kk != "bf16"}
        if timed:
            best = min(timed, key=timed.get)
            cell["best"], cell["best_us"] = best, timed[best]
        res["cells"].append(cell)
        print(json.dumps({kk: (round(v, 1) if isinstance(v, float) else v) for kk, v in cell.items()
                          if not kk.endswith("_error") and kk != "rule"}), flush=True)
        errs = {kk: v for kk, v in cell.items() if kk.endswith("_error")}
        if errs:
            print("  errors:", json.dumps(errs)[:600], flush=True)
        Path(OUT, "sweep-kperm.json").write_text(json.dumps(res, indent=1))
    del w, w4, ws
    torch.cuda.empty_cache()
print(f"sweep done in {time.time() - t_start:.0f} s", flush=True)
