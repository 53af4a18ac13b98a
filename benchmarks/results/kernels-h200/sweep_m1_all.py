# ruff: noqa: B023  (each lambda runs inside bench() in the iteration that made it)
"""M = 1 launch sweep for the dispatch rule: the five issue shapes plus the Llama-3-8B decode shapes (k/v
1024x4096, fused q/k/v 6144x4096, fused gate/up 28672x4096, lm_head 128256x4096), 4 and 8 bits: bf16 vs
gemv1 at its rule vs gemv1h over launch configs (its default first); with `p`, gemv1h at its default and
the packed-half2 gemv1p (triton_gemv_h2) over launch configs instead; `pipe`: gemv1p's rule against its
cp.async-pipelined variant. Every timed config is first checked
against a float32 dequantized matmul (relative error < 1e-2). Writes $OUT/sweep-m1-all.json (-p.json).

    python benchmarks/results/kernels-h200/sweep_m1_all.py [budget_s_per_cell] [h|p|pipe]
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
from bitsmith.kernels import triton_gemv1 as T1
from bitsmith.primitives import dequantize_weight

OUT = os.environ.get("OUT", "/tmp")
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672),
          (1024, 4096), (6144, 4096), (28672, 4096), (128256, 4096)]
budget = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
KIND = sys.argv[2] if len(sys.argv) > 2 else "h"
res = {"dev": torch.cuda.get_device_name(), "kind": KIND, "cells": []}
OUTFILE = {"h": "sweep-m1-all.json", "p": "sweep-m1-all-p.json", "pipe": "sweep-m1-all-pipe.json"}[KIND]


def configs_pipe(n, k, bits):
    """gemv1p's rule, then Triton's cp.async pipeline (pipe = stages) at several tiles and splits."""
    base = kernels.gemv1p_config(n, k, bits)
    out = [base]
    for bn, bw, nw, pipe in ((64, 32, 1, 3), (64, 16, 1, 4), (32, 16, 1, 4), (64, 32, 1, 4), (128, 32, 2, 3),
                             (64, 16, 1, 3)):
        for f in (1, 2):
            sk = max(1, min(16, int(base["split_k"] * f)))
            c = {"block_n": bn, "block_w": bw, "split_k": sk, "num_warps": nw, "pipe": pipe}
            if c not in out and -(-n // bn) >= 8 and k * bits // 32 // bw // sk >= 2:
                out.append(c)
    return out


def configs_p(n, k, bits):
    base = kernels.gemv1p_config(n, k, bits)
    out = [base]
    for bn, nw, w in ((64, 1, 16), (32, 1, 16), (128, 2, 16), (64, 1, 8), (64, 1, 32), (128, 4, 16), (256, 4, 16)):
        for f in (1, 2, 0.5):
            sk = max(1, min(16, int(base["split_k"] * f)))
            c = {"block_n": bn, "block_w": w, "split_k": sk, "num_warps": nw}
            if c not in out and -(-n // bn) >= 8:
                out.append(c)
    return out


def configs(n, k, bits):
    base = kernels.gemv1h_config(n, k, bits)
    out = [base]
    bw = base["block_w"]
    cands = ([(64, 1, bw), (32, 1, bw), (128, 1, bw), (128, 2, bw), (64, 1, 2 * bw), (256, 4, bw)] if bits == 4 else
             [(128, 4, bw), (64, 1, bw), (64, 1, bw // 2), (32, 1, bw), (128, 2, bw), (256, 4, bw)])
    for bn, nw, w in cands:
        for f in (1, 2, 0.5):
            sk = max(1, min(16, int(base["split_k"] * f)))
            c = {"block_n": bn, "block_w": w, "split_k": sk, "num_warps": nw}
            if c not in out and -(-n // bn) >= 8:
                out.append(c)
    return out


for n, k in SHAPES:
    w, w4, w8, *_ = KB.make_layers(n, k)
    ws = [w.clone() for _ in range(KB.copies_for(n * k * 2))]
    for bits, mod in ((4, w4), (8, w8)):
        P = KB.rotated_packs(mod)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dequantize_weight(mod.qweight(), torch.float32).t()
        cell = {"N": n, "K": k, "bits": bits, "bf16": KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])}
        c1 = kernels.gemv1_config(n, k, bits)
        cell["gemv1"] = KB.bench([lambda q=q: T1.gemv1(x, q, None, **c1) for q in P])
        cell["gemv1_err"] = float((T1.gemv1(x, P[0], None, **c1).float() - ref).norm() / ref.norm())
        if KIND in ("p", "pipe"):
            ch = kernels.gemv1h_config(n, k, bits)
            cell["gemv1h"] = KB.bench([lambda q=q: T1.gemv1h(x, q, None, **ch) for q in P])
        fn, cfgs = {"h": (T1.gemv1h, configs), "p": (H2.gemv1p, configs_p),
                    "pipe": (H2.gemv1p, configs_pipe)}[KIND]
        cfgs = cfgs(n, k, bits)
        t0, best = time.time(), None
        for i, cfg in enumerate(cfgs):
            if time.time() - t0 > budget and i > 0:
                break
            try:
                e = float((fn(x, P[0], None, **cfg).float() - ref).norm() / ref.norm())
                assert e < 1e-2, e
                us = KB.bench([lambda q=q: fn(x, q, None, **cfg) for q in P])
            except Exception as ex:  # noqa: BLE001 - a failing config is a result
                print("cfg fail", n, k, bits, cfg, str(ex)[:200], flush=True)
                continue
            cell.setdefault("h_all", []).append([round(us, 2), cfg])
            if i == 0:
                cell["gemv1h_default"] = us
            if best is None or us < best[0]:
                best = (us, cfg, e)
        if best:
            cell["gemv1h_best"], cell["gemv1h_best_cfg"], cell["gemv1h_best_err"] = best
        res["cells"].append(cell)
        b = cell["bf16"]
        print(f"{n}x{k} b{bits} bf16 {b:.1f} gemv1 {cell['gemv1']:.1f} ({b / cell['gemv1']:.2f}x) "
              f"gemv1h {cell.get('gemv1h', float('nan')):.1f} swept ({KIND}) default "
              f"{cell.get('gemv1h_default', float('nan')):.1f} best {best[0] if best else float('nan'):.1f} "
              f"({b / best[0] if best else float('nan'):.2f}x) {best[1] if best else ''}", flush=True)
        Path(OUT, OUTFILE).write_text(json.dumps(res, indent=1))
    del w, w4, w8, ws, P
    torch.cuda.empty_cache()
