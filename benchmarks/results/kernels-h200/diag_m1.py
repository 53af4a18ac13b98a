"""Diagnosis run of this session (device): (1) a few launches of the two M = 1 GEMVs on the large shapes, for
Nsight Compute (`ncu ... python diag_m1.py gemv`); (2) the FP8 W8A8 path split into its parts: the row
quantization's codes against reference.py, then torch._scaled_mm (use_fast_accum False / True) against a
float32 product of the kernel's own codes, over fresh random inputs at the tests' shapes (`... fp8`)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernels as KB  # benchmarks/kernels.py

from bitsmith import kernels
from bitsmith.kernels import reference
from bitsmith.kernels import triton_w8a8 as W
from bitsmith.kernels import triton_gemv1 as T1

if sys.argv[1] == "gemv":
    for n, k in ((8192, 28672), (28672, 8192)):
        _, w4, *_ = KB.make_layers(n, k)
        p = kernels.operands(w4, "triton_gemm")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        c1, ch = kernels.gemv1_config(n, k, 4), kernels.gemv1h_config(n, k, 4)
        print(n, k, c1, ch, flush=True)
        for _ in range(3):
            T1.gemv1(x, p, None, **c1)
            T1.gemv1h(x, p, None, **ch)
        torch.cuda.synchronize()
else:
    torch.manual_seed(0)
    for k in (576, 1536, 4096):
        n = 208
        stats = {"code_rows_off": 0, "scale_rows_off": 0, "int8_code_rows_off": 0, "int8_scale_rows_off": 0,
                 "cpu_vs_cuda_ref_rows_off": 0, "rows": 0, "fails_slow": 0, "fails_fast": 0, "max_rel_slow": 0.0, "max_rel_fast": 0.0,
                 "fails_vs_ref": 0}
        for trial in range(30):
            w = torch.randn(n, k, device="cuda")
            ws = w.abs().amax(1) / reference.FP8_E4M3_MAX
            w8 = (w / ws[:, None]).to(torch.float8_e4m3fn)
            for m in (1, 3, 17, 64):
                x = torch.randn(m, k, device="cuda").half()
                xq, sx = W.quantize_rows(x, fp8=True)
                rq, rs = reference.quantize_rows_fp8(x)
                stats["code_rows_off"] += int((xq.float() != rq.float()).any(1).sum())
                stats["scale_rows_off"] += int((sx != rs.view(-1)).sum())
                cq, cs = reference.quantize_rows_fp8(x.cpu())
                stats["cpu_vs_cuda_ref_rows_off"] += int(((cq.float() != rq.float().cpu()).any(1)
                                                          | (cs != rs.cpu()).view(-1)).sum())
                iq, isx = W.quantize_rows(x)
                riq, ris = reference.quantize_rows_int8(x)
                stats["int8_code_rows_off"] += int((iq != riq).any(1).sum())
                stats["int8_scale_rows_off"] += int((isx != ris.view(-1)).sum())
                stats["rows"] += m
                exact = (xq.float() * sx[:, None]) @ (w8.float() * ws[:, None]).t()
                rms = exact.pow(2).mean().sqrt()
                for fast in (False, True):
                    y = torch._scaled_mm(xq, w8.t(), scale_a=sx.view(-1, 1), scale_b=ws.view(1, -1),
                                         out_dtype=torch.bfloat16, use_fast_accum=fast)
                    e = (y.float() - exact).abs()
                    key = "fast" if fast else "slow"
                    stats["fails_" + key] += int((e > 1e-2 * exact.abs() + 1e-2 * rms).any())
                    stats["max_rel_" + key] = max(stats["max_rel_" + key], float((e / (exact.abs() + rms)).max()))
                bias = torch.randn(n, device="cuda").half()
                yk = W.fp8_scaled_mm(x, w8, ws, bias).float()
                ref = reference.fp8_linear(x, w8, ws, bias).float()
                stats["fails_vs_ref"] += int(((yk - ref).abs() > 1e-2 * ref.abs() + 1e-2 * ref.pow(2).mean().sqrt()).any())
        print("K", k, stats, flush=True)
