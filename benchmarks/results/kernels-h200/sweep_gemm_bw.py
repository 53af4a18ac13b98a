# ruff: noqa: B023  (each lambda runs inside bench() in the iteration that made it)
"""4-bit tensor-core GEMM at M = 16 and 64 on the five issue shapes: the rule's launch (gemm_config) vs two
groups per K step (block_w 32, what won for the M = 1 GEMVs), 8 warps, and both; bf16 in the same run.
Each config is first checked against a float32 dequantized matmul (relative error < 1e-2).
Writes $OUT/sweep-gemm-bw.json.

    python benchmarks/results/kernels-h200/sweep_gemm_bw.py
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernels as KB  # benchmarks/kernels.py

from bitsmith import kernels
from bitsmith.kernels import triton_gemm as TG
from bitsmith.primitives import dequantize_weight

OUT = os.environ.get("OUT", "/tmp")
res = {"dev": torch.cuda.get_device_name(), "cells": []}
for n, k in KB.SHAPES:
    w, w4, *_ = KB.make_layers(n, k)
    ws = [w.clone() for _ in range(KB.copies_for(n * k * 2))]
    P = KB.rotated_packs(w4)
    wref = dequantize_weight(w4.qweight(), torch.float32)
    for m in (16, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ wref.t()
        d = kernels.gemm_config(m, n, k, 4)
        cell = {"N": n, "K": k, "M": m, "bf16": KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])}
        for name, cfg in {"default": d, "bw32": {**d, "block_w": 32}, "w8": {**d, "num_warps": 8},
                          "bw32_w8": {**d, "block_w": 32, "num_warps": 8},
                          "bw32_split2x": {**d, "block_w": 32, "split_k": 2 * d["split_k"]}}.items():
            try:
                e = float((TG.gemm(x, P[0], None, **cfg).float() - ref).norm() / ref.norm())
                assert e < 1e-2, e
                cell[name] = KB.bench([lambda q=q: TG.gemm(x, q, None, **cfg) for q in P])
            except Exception as ex:  # noqa: BLE001 - a failing config is a result
                cell[name + "_error"] = str(ex)[:200]
        res["cells"].append(cell)
        print(json.dumps({kk: (round(v, 1) if isinstance(v, float) else v) for kk, v in cell.items()}), flush=True)
        Path(OUT, "sweep-gemm-bw.json").write_text(json.dumps(res, indent=1))
    del w, w4, ws, P
    torch.cuda.empty_cache()
