"""The scratch sweep behind README's GEMM launch rules (as run, except: paths adjusted to live
here, and the rows of the per-code-position GEMM variant, since removed, dropped):
correctness vs a float32 dequantized matmul, then timings of the swapped tensor-core GEMM's launch configs,
the GEMVs and dequantize + cuBLAS, bf16 in the same run. Writes $OUT/explore.json (sweep-gemm.json here).

    python benchmarks/results/kernels-h200/sweep_gemm.py 28672x8192,8192x28672,4096x4096 1,16,64,256,2048 9
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
from bitsmith.kernels import triton_gemv1 as T1, triton_gemm as TG, triton_wq as T
from bitsmith.primitives import dequantize_weight

OUT = os.environ.get("OUT", "/tmp")
res = {"copy_GBps": KB.copy_rate() / 1e9, "dev": torch.cuda.get_device_name(), "cells": []}
print(json.dumps(res), flush=True)
shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
ms = [int(v) for v in sys.argv[2].split(",")]
budget = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
checked = set()

def check(mod, p, cfg, m, wref):
    key = (mod.n, mod.k, m, tuple(sorted(cfg.items())))
    if key in checked:
        return
    checked.add(key)
    x = torch.randn(m, mod.k, device="cuda", dtype=torch.bfloat16)
    y = TG.gemm(x, p, None, **cfg).float()
    ref = x.float() @ wref.t()
    err = float((y - ref).norm() / ref.norm())
    assert err < 1e-2, (cfg, err)

def configs(m, n, k, bits):
    bw = 16 if bits == 4 else 32
    out = []
    def add(bm, bn, nw, sk, st):
        progs = -(-n // bn) * sk * -(-m // bm)
        if 32 <= progs <= 8192 and k // 128 // sk >= 2:
            out.append({"block_m": bm, "block_n": bn, "split_k": sk, "num_stages": st, "num_warps": nw, "block_w": bw})
    if m <= 16:
        for bn, nw, sk, st in [(64, 4, 4, 3), (64, 2, 4, 3), (128, 4, 4, 3), (128, 2, 4, 3), (64, 4, 2, 4), (64, 4, 8, 3),
                               (128, 4, 8, 4), (256, 8, 4, 3), (64, 2, 8, 4), (128, 4, 2, 3), (64, 4, 1, 3), (128, 4, 1, 3)]:
            add(16, bn, nw, sk, st)
    elif m <= 64:
        for bm, bn, nw, sk in [(64, 64, 4, 2), (64, 128, 4, 4), (64, 128, 4, 2), (32, 64, 4, 2), (64, 64, 2, 2), (64, 128, 8, 2),
                               (64, 256, 8, 2), (64, 64, 4, 4), (64, 128, 4, 1), (64, 64, 4, 1)]:
            add(bm, bn, nw, sk, 3)
    elif m <= 256:
        for bm, bn, nw in ((128, 128, 8), (256, 128, 8), (64, 128, 4), (128, 64, 4), (128, 256, 8), (256, 64, 8)):
            add(bm, bn, nw, 1, 3)
    else:
        for bm, bn, nw, st in ((128, 128, 8, 3), (256, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 4), (256, 64, 8, 4)):
            add(bm, bn, nw, 1, st)
    return out


for n, k in shapes:
    w, w4, w8, *_ = KB.make_layers(n, k)
    ws = [w.clone() for _ in range(KB.copies_for(n * k * 2))]
    mods = {4: w4, 8: w8}
    packs = {b: KB.rotated_packs(mm) for b, mm in mods.items()}
    wref = {b: dequantize_weight(mm.qweight(), torch.float32) for b, mm in mods.items()}
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cell = {"N": n, "K": k, "M": m, "bf16": KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])}
        for bits in (4, 8):
            if bits == 8 and m > 16:
                continue
            P = packs[bits]
            pre = f"w{bits}_"
            if m == 1:
                cfg1 = kernels.gemv1_config(n, k, bits)
                cell[pre + "gemv1"] = KB.bench([lambda q=q: T1.gemv1(x, q, None, **cfg1) for q in P])
            if m <= 4:
                cfgv = kernels.gemv_config(m, n, k)
                cell[pre + "gemv"] = KB.bench([lambda q=q: T.gemv(x, q, None, **cfgv) for q in P])
            if bits == 4 and m >= 16:
                cell[pre + "dequant"] = KB.bench([lambda q=q: TG.dequant_matmul(x, q, None) for q in P])
            dflt = kernels.gemm_config(m, n, k, bits)
            cands = [dflt] + [c for c in configs(m, n, k, bits) if c != dflt]
            best, t0 = None, time.time()
            for cfg in cands:
                if time.time() - t0 > budget:
                    break
                try:
                    check(mods[bits], P[0], cfg, m, wref[bits])
                    us = KB.bench([lambda q=q: TG.gemm(x, q, None, **cfg) for q in P])
                except Exception as e:  # noqa: BLE001 - a failing config is a result
                    print("cfg fail", cfg, str(e)[:300], flush=True)
                    continue
                if cfg is dflt:
                    cell[pre + "gemm_default"] = us
                if best is None or us < best[0]:
                    best = (us, cfg)
            if best:
                cell[pre + "gemm_best"] = best[0]
                cell[pre + "gemm_best_cfg"] = best[1]
                if bits == 4:
                    try:
                        cell[pre + "gemm_best_noasm"] = KB.bench([lambda q=q: TG.gemm(x, q, None, **{**best[1], 'asm': False}) for q in P])
                    except Exception as e:  # noqa: BLE001 - a failing config is a result
                        cell[pre + "noasm_err"] = str(e)[:200]
        res["cells"].append(cell)
        short = {kk: (round(v, 1) if isinstance(v, float) else v) for kk, v in cell.items()}
        print(json.dumps(short), flush=True)
    del w, w4, w8, ws, packs, wref, mods
    torch.cuda.empty_cache()
    Path(OUT, "explore.json").write_text(json.dumps(res, indent=1))
print("\nSUMMARY (us; x = bf16/us)")
for c in res["cells"]:
    b = c["bf16"]
    items = [f"{kk}={c[kk]:.1f}({b / c[kk]:.2f}x)" for kk in c if isinstance(c[kk], float) and kk != "bf16"]
    print(f"{c['N']}x{c['K']} M={c['M']} bf16={b:.1f} " + " ".join(items), c.get("w4_gemm_best_cfg"))
