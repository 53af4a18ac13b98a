# ruff: noqa: B023  (each lambda runs inside bench() in the iteration that made it)
"""W8A8 int8 at large M: the Triton int8 GEMM (cp.async kernel) over tiles / stages, the bulk-copy (TMA)
kernel, non-persistent and persistent, and torch._int_mm + the Triton epilogue, against bf16 timed three
times in the same run (before, between and after: the spread of the bf16 cell). Per-token activation
quantization is in every int8 time. Each config is first checked against the default kernel's output
(same integer sums and scales: relative difference < 1e-3). Writes $OUT/sweep-w8a8.json.
(The first run, sweep-w8a8.json, compared against the cp.async kernel's 256x128x128 default; later runs
against int8_fused's default of the time, and QUICK=1 times only the first two of each list.)

    python benchmarks/results/kernels-h200/sweep_w8a8.py [shapes] [ms]
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernels as KB  # benchmarks/kernels.py

from bitsmith.kernels import triton_w8a8 as W

OUT = os.environ.get("OUT", "/tmp")
shapes = [tuple(map(int, s.split("x"))) for s in (sys.argv[1] if len(sys.argv) > 1 else
          "28672x8192,8192x28672").split(",")]
ms = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "2048").split(",")]
SMS = torch.cuda.get_device_properties(0).multi_processor_count
OLD = [(256, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 4),
       (128, 128, 128, 8, 4), (256, 128, 64, 8, 4)]
TMA = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
       (128, 256, 64, 8, 5), (256, 128, 64, 8, 5)]
res = {"dev": torch.cuda.get_device_name(), "sms": SMS, "cells": []}

for n, k in shapes:
    torch.manual_seed(0)
    w8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    sw = torch.rand(n, device="cuda") * 0.01
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    i8s = [(w8.clone(), sw.clone()) for _ in range(KB.copies_for(n * k))]
    wbs = [wb.clone() for _ in range(KB.copies_for(2 * n * k))]
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cell = {"N": n, "K": k, "M": m, "bf16": [], "int8": {}}

        def bf16(wbs=wbs):
            cell["bf16"].append(KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in wbs]))

        bf16()
        ref = W.int8_fused(x, w8, sw).float()
        keys = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
        cands = {f"old_{'x'.join(map(str, c))}": {**dict(zip(keys, c)), "tma": False} for c in OLD}
        if os.environ.get("QUICK"):
            cands = dict(list(cands.items())[:2])
        for c in TMA[:2] if os.environ.get("QUICK") else TMA:
            cfg = dict(zip(keys, c), tma=True)
            cands[f"tma_{'x'.join(map(str, c))}"] = cfg
            if c[0] * c[1] >= 128 * 256:
                cands[f"tmap_{'x'.join(map(str, c))}"] = {**cfg, "persistent": SMS}
                cands[f"tmapf_{'x'.join(map(str, c))}"] = {**cfg, "persistent": SMS, "flatten": True}
        for i, (name, cfg) in enumerate(cands.items()):
            if i == len(cands) // 2:
                bf16()
            try:
                y = W.int8_fused(x, w8, sw, **cfg).float()
                e = float((y - ref).norm() / ref.norm())
                assert e < 1e-3, e
                cell["int8"][name] = [KB.bench([lambda p=p: W.int8_fused(x, p[0], p[1], **cfg) for p in i8s]), e]
            except Exception as ex:  # noqa: BLE001 - a failing config is a result
                cell["int8"][name] = str(ex)[:200]
            print(n, k, m, name, cell["int8"][name], flush=True)
        if m > 16:
            cell["intmm"] = KB.bench([lambda p=p: W.int8_intmm(x, p[0], p[1]) for p in i8s])
            cell["intmm_raw"] = KB.bench([lambda p=p: torch._int_mm(W.quantize_rows(x)[0], p[0].t()) for p in i8s])
        cell["quantize_rows"] = KB.bench([lambda: W.quantize_rows(x)])
        bf16()
        res["cells"].append(cell)
        ok = {kk: v[0] for kk, v in cell["int8"].items() if isinstance(v, list)}
        best = min(ok, key=ok.get)
        print(f"SUMMARY {n}x{k} M={m} bf16 {[round(b, 1) for b in cell['bf16']]} best {best} {ok[best]:.1f} "
              f"(x{min(cell['bf16']) / ok[best]:.2f}..{max(cell['bf16']) / ok[best]:.2f}) default "
              f"{ok.get('old_256x128x128x8x3', float('nan')):.1f} intmm {cell.get('intmm', float('nan')):.1f}", flush=True)
        Path(OUT, "sweep-w8a8.json").write_text(json.dumps(res, indent=1))
    del w8, wb, i8s, wbs
    torch.cuda.empty_cache()
