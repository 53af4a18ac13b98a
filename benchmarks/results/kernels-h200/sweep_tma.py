# ruff: noqa: B023  (each lambda runs inside bench() in the iteration that made it)
"""Session 7 sweep: the copy-engine (TMA) launches against the current ones, bf16 in the same run.
  M = 1:        gemv1p (rule) vs gemv1p with TMA word tiles PIPE deep, vs the TMA GEMM at block_m 16;
                4 and 8 bits.
  M = 4..256:   gemm (rule) vs gemm with TMA x and word tiles, stages and tiles swept.
  M >= 16:      the stored-order packed dequant + cuBLAS, tiles swept (SKIP_DEQUANT=1: not).
  M = 2048:     the TMA GEMM at 128-256 x 128 tiles.
  M1_GRID=2:    a finer M = 1 grid around call 1's winners (pipe 2-4, splits around 768 programs).
  M1_GRID=3:    4 bits, more one-warp programs per SM (32-row tiles, splits up to 4x the rule's).
  W4_ONLY=1:    M = 1 at 4 bits only.
  SA=1:         session 8: at M = 2..64 only the rule and the rule's tiles, each with and without
                scale_after (the scales applied to each K step's product, not to the dequantized tile).
Each config is first checked against a float32 dequantized matmul (relative error < 1e-2); a failing or
wrong config is recorded, not timed. Writes $OUT/sweep-tma.json as it goes; stops starting cells after
BUDGET seconds.

    BUDGET=300 python benchmarks/results/kernels-h200/sweep_tma.py
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
from bitsmith.kernels import triton_gemv_h2 as H2
from bitsmith.kernels import triton_gemm as TG
from bitsmith.primitives import dequantize_weight

OUT = os.environ.get("OUT", "/tmp")
BUDGET = float(os.environ.get("BUDGET", "300"))
SHAPES = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("SHAPES", "").split(",") if s] or KB.SHAPES
MS = [int(v) for v in os.environ.get("MS", "1,4,16,64,256,2048").split(",")]
t_start = time.time()
res = {"dev": torch.cuda.get_device_name(), "cells": []}


def check_and_time(cell, name, fn_of_pack, packs, x, ref):
    try:
        e = float((fn_of_pack(packs[0]).float() - ref).norm() / ref.norm())
        if not e < 1e-2:
            cell[name + "_error"] = f"rel err {e:.3g}"
            return
        cell[name] = KB.bench([lambda q=q: fn_of_pack(q) for q in packs])
    except Exception as ex:  # noqa: BLE001 - a failing config is a result
        cell[name + "_error"] = str(ex)[:200]


def m1_cells(n, k, mod, bits):
    packs = KB.rotated_packs(mod)
    wref = dequantize_weight(mod.qweight(), torch.float32)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ wref.t()
    cell = {"N": n, "K": k, "M": 1, "bits": bits}
    d = kernels.gemv1p_config(n, k, bits)
    cell["rule"] = d
    check_and_time(cell, "gemv1p_rule", lambda q: H2.gemv1p(x, q, None, **d), packs, x, ref)
    bw0 = 16 if bits == 4 else 32
    grid = os.environ.get("M1_GRID")
    if grid in ("2", "3"):       # second call: around the first call's winners; fourth: more programs
        for bn, nw, pipes in ([(64, 1, (2, 3, 4)), (128, 2, (3,))] if grid == "2" else
                              [(32, 1, (2, 3, 4)), (64, 1, (2, 4))]):
            blocks = -(-n // bn)
            s768 = 1
            while blocks * s768 < 768 and (k * bits // 32) // bw0 // (2 * s768) >= 4:
                s768 *= 2
            for sk in sorted({max(1, s768 // 2), s768, 2 * s768} if grid == "2" else {s768, 2 * s768, 4 * s768}):
                for pipe in pipes:
                    cfg = {"block_n": bn, "block_w": bw0, "num_warps": nw, "split_k": sk, "pipe": pipe, "tma": True}
                    check_and_time(cell, f"tma_bn{bn}_bw{bw0}_w{nw}_sk{sk}_p{pipe}",
                                   lambda q, cfg=cfg: H2.gemv1p(x, q, None, **cfg), packs, x, ref)
        return cell
    for bn, bw, nw in [(64, bw0, 1), (64, 2 * bw0, 1), (128, bw0, 2), (128, 2 * bw0, 4), (32, 2 * bw0, 1),
                       (256, bw0, 4)]:
        blocks = -(-n // bn)
        steps = (k * bits // 32) // bw
        for target in (1024, 2048):
            sk = 1
            while blocks * sk < target and steps // (2 * sk) >= 2:
                sk *= 2
            for pipe in (3, 5):
                cfg = {"block_n": bn, "block_w": bw, "num_warps": nw, "split_k": sk, "pipe": pipe, "tma": True}
                check_and_time(cell, f"tma_bn{bn}_bw{bw}_w{nw}_sk{sk}_p{pipe}",
                               lambda q, cfg=cfg: H2.gemv1p(x, q, None, **cfg), packs, x, ref)
    if bits == 4:
        for bn, sk, st in [(64, 8, 4), (64, 4, 4), (128, 4, 4), (64, 8, 6)]:
            cfg = {"block_m": 16, "block_n": bn, "split_k": sk, "num_warps": 4, "num_stages": st, "tma": True}
            check_and_time(cell, f"gemmtma_bn{bn}_sk{sk}_s{st}", lambda q, cfg=cfg: TG.gemm(x, q, None, **cfg),
                           packs, x, ref)
    return cell


def gemm_cells(n, k, mod, m):
    packs = KB.rotated_packs(mod)
    wref = dequantize_weight(mod.qweight(), torch.float32)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ wref.t()
    cell = {"N": n, "K": k, "M": m, "bits": 4}
    d = kernels.gemm_config(m, n, k, 4)
    cell["rule"] = d
    if m <= 256:
        check_and_time(cell, "gemm_rule", lambda q: TG.gemm(x, q, None, **d), packs, x, ref)
    if os.environ.get("SA") and m <= 64:
        check_and_time(cell, "gemm_rule_sa", lambda q: TG.gemm(x, q, None, **{**d, "scale_after": True}), packs, x,
                       ref)
        for tma in (d["tma"],):
            for st in (3, 4):
                for sk in sorted({d["split_k"], max(1, d["split_k"] // 2)}):
                    cfg = {**d, "tma": tma, "num_stages": st, "split_k": sk}
                    cfg.pop("scale_after", None)
                    for sa in (False, True):
                        key = f"t{int(tma)}_s{st}_sk{sk}" + ("_sa" if sa else "")
                        check_and_time(cell, key, lambda q, cfg=cfg, sa=sa: TG.gemm(x, q, None, **cfg, scale_after=sa),
                                       packs, x, ref)
        return cell
    if m >= 16 and not os.environ.get("SKIP_DEQUANT"):
        # (call 1 also timed the x_pi-order dequantization it replaced, commit 8155454, as "dequant_pi")
        for bn, bw, nw in [(32, 16, 4), (64, 16, 4), (32, 32, 4), (64, 32, 8)]:
            cfg = {"block_n": bn, "block_w": bw, "num_warps": nw}
            check_and_time(cell, f"dequant_s_bn{bn}_bw{bw}_w{nw}",
                           lambda q, cfg=cfg: TG.dequant_matmul(x, q, None, **cfg), packs, x, ref)
    if m > 256:          # large M: the TMA GEMM against the bf16 GEMM it must not lose to
        for bm, bn, st in [(128, 128, 4), (256, 128, 3), (128, 256, 3)]:
            cfg = {"block_m": bm, "block_n": bn, "split_k": 1, "num_warps": 8, "num_stages": st, "block_w": 16,
                   "tma": True}
            check_and_time(cell, f"tma_bm{bm}_bn{bn}_w8_sk1_s{st}", lambda q, cfg=cfg: TG.gemm(x, q, None, **cfg),
                           packs, x, ref)
        return cell
    tiles = ([(16, 64, 4), (16, 128, 4)] if m <= 16 else [(64, 64, 4), (64, 128, 4), (64, 128, 8)] if m <= 64
             else [(128, 128, 8), (256, 128, 8), (128, 64, 4)])
    for bm, bn, nw in tiles:
        blocks = -(-m // bm) * -(-n // bn)
        for target in ((1024, 2048) if m <= 16 else (256, 512) if m <= 64 else (1, 264)):
            sk = 1
            while blocks * sk < target and k // (128 * 2 * sk) >= 4:
                sk *= 2
            for st in (3, 4, 6):
                cfg = {"block_m": bm, "block_n": bn, "split_k": sk, "num_warps": nw, "num_stages": st,
                       "block_w": 16, "tma": True}
                key = f"tma_bm{bm}_bn{bn}_w{nw}_sk{sk}_s{st}"
                if key in cell or key + "_error" in cell:
                    continue
                check_and_time(cell, key, lambda q, cfg=cfg: TG.gemm(x, q, None, **cfg), packs, x, ref)
    return cell


for n, k in SHAPES:
    if time.time() - t_start > BUDGET:
        break
    w, w4, w8, *_ = KB.make_layers(n, k)
    ws = [w.clone() for _ in range(KB.copies_for(n * k * 2))]
    for m in MS:
        if time.time() - t_start > BUDGET:
            break
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bf = KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])
        big = n * k >= 2**27
        w8_too = not os.environ.get("W4_ONLY") and (big or not os.environ.get("M1_GRID"))
        cells = ([m1_cells(n, k, w4, 4)] + ([m1_cells(n, k, w8, 8)] if w8_too else [])
                 if m == 1 else [gemm_cells(n, k, w4, m)])
        for cell in cells:
            cell["bf16"] = bf
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
            Path(OUT, "sweep-tma.json").write_text(json.dumps(res, indent=1))
    del w, w4, w8, ws
    torch.cuda.empty_cache()
print(f"sweep done in {time.time() - t_start:.0f} s", flush=True)
