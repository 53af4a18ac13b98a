"""gemv1p under Nsight Compute (call 6): the dispatch launches on 8192x28672 (4-bit, 64 x 32 register
prefetch), 4096x14336 (4-bit, pipelined 64 x 16) and 28672x8192 (8-bit), two calls each (the first compiles).
--small (session 8): the 8B decode's small layers instead, 4096x4096 and 6144x4096 at 4 bits.

    ncu --clock-control none -k regex:gemv1p --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis \\
        python benchmarks/results/kernels-h200/diag_gemv1p.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bitsmith import kernels  # noqa: E402
from bitsmith.kernels import triton_gemv_h2 as H2  # noqa: E402
from bitsmith.nn import QuantLinear  # noqa: E402
from bitsmith.primitives import quantize_weight  # noqa: E402
from bitsmith.recipe import Scheme  # noqa: E402

SHAPES = ((4096, 4096, 4), (6144, 4096, 4)) if "--small" in sys.argv else \
    ((8192, 28672, 4), (4096, 14336, 4), (28672, 8192, 8))
for n, k, bits in SHAPES:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    scheme = Scheme(bits=4, group_size=128) if bits == 4 else Scheme(bits=8, group_size=None, symmetric=True)
    mod = QuantLinear.from_qweight(quantize_weight(w, scheme)).cuda()
    p = kernels.operands(mod, "triton_gemv1p")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    cfg = kernels.gemv1p_config(n, k, bits)
    for _ in range(2):
        H2.gemv1p(x, p, None, **cfg)
    torch.cuda.synchronize()
    print(n, k, bits, cfg, flush=True)
    del w, mod, p
    torch.cuda.empty_cache()
