"""M = 1, 4-bit g128: bf16 vs gemv1 (dispatch) vs gemv1h at its default launch, on the five issue shapes.
Each kernel checked against a float32 dequantized matmul first. Prints one JSON line per shape.

    python benchmarks/results/kernels-h200/m1_default.py
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernels as KB  # benchmarks/kernels.py

from bitsmith import kernels
from bitsmith.kernels import triton_gemv1 as T1
from bitsmith.primitives import dequantize_weight

for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)):
    w, w4, *_ = KB.make_layers(n, k)
    ws = [w.clone() for _ in range(KB.copies_for(n * k * 2))]
    P = KB.rotated_packs(w4)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ dequantize_weight(w4.qweight(), torch.float32).t()
    c1, ch = kernels.gemv1_config(n, k, 4), kernels.gemv1h_config(n, k, 4)
    errs = {name: float((f(x, P[0], None, **c).float() - ref).norm() / ref.norm())
            for name, f, c in (("gemv1", T1.gemv1, c1), ("gemv1h", T1.gemv1h, ch))}
    row = {"N": n, "K": k, "bf16": KB.bench([lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws]),
           "gemv1": KB.bench([lambda q=q: T1.gemv1(x, q, None, **c1) for q in P]),
           "gemv1h": KB.bench([lambda q=q: T1.gemv1h(x, q, None, **ch) for q in P]), "err": errs, "cfg_h": ch}
    print(json.dumps(row), flush=True)
