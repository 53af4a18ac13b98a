"""Kernel micro-benchmark (issue 8): bf16 torch.matmul vs torch's int4 kernel (g128) vs bitsmith's kernels.

Shapes (N, K) = (4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672) at M = 1, 4, 16, 64,
256, 2048. Rows: bf16 `torch.matmul`; `torch._weight_int4pack_mm` (tinygemm, g128); bitsmith W4A16 g128
(asymmetric) through QuantLinear's own dispatch (`auto`) and each kernel forced; W8A16 per-channel; W8A8
int8 (Triton fused epilogue and torch._int_mm) and FP8 e4m3 (torch._scaled_mm), both with per-token
activation quantization included in the time.

Timing: each measured call is captured REPS times in a CUDA graph (no Python or launch overhead in the
numbers) over enough independent copies of the weights that they cannot sit in L2 (copies rotate), and the
median over 7 replays is reported, in microseconds per call. Effective GB/s = bytes of weights (+ scales,
zeros) + x + y over time, against the device-to-device copy rate measured in the same run.
With --tune, GEMV/GEMM/int8 launch configurations are swept first (a time budget per shape and M); the
winners are used by the rows below, QuantLinear's own dispatch ("auto") included, and saved in the JSON.

    python benchmarks/kernels.py --json $OUT/kernels.json [--tune] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitsmith import kernels  # noqa: E402
from bitsmith.kernels import triton_gemm, triton_gemv1, triton_gemv_h2, triton_w8a8, triton_wq  # noqa: E402
from bitsmith.nn import QuantLinear  # noqa: E402
from bitsmith.primitives import quantize_weight  # noqa: E402
from bitsmith.recipe import Scheme  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
MS = [1, 4, 16, 64, 256, 2048]
L2_BYTES = 50 * 2**20
REPS = 10


def bench(fns: list, reps: int = REPS) -> float:
    """Median microseconds per call of fns (rotated), from CUDA-graph replays."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
    del g
    return statistics.median(times)


def timed(r: dict, key: str, fns: list) -> None:
    """r[key] = bench(fns), or r[key + '_error'] if the kernel fails (the run goes on)."""
    try:
        r[key] = bench(fns)
    except Exception as e:                       # noqa: BLE001 - a failing kernel is a result, not a crash
        r[key + "_error"] = str(e)[:300]
        print(f"{key} failed at N={r['N']} K={r['K']} M={r['M']}: {str(e)[:300]}", file=sys.stderr)


def copy_rate() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = bench([lambda: dst.copy_(src)], reps=5)
    return 2 * src.numel() / (us * 1e-6)


def copies_for(nbytes: int) -> int:
    return max(1, min(16, math.ceil(3 * L2_BYTES / max(nbytes, 1))))


def make_layers(n: int, k: int):
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    w4 = QuantLinear.from_qweight(quantize_weight(w, Scheme(bits=4, group_size=128))).cuda()
    w8 = QuantLinear.from_qweight(quantize_weight(w, Scheme(bits=8, group_size=None, symmetric=True))).cuda()
    sw8 = w.float().abs().amax(1) / 127
    i8 = torch.round(w.float() / sw8[:, None]).clamp(-127, 127).to(torch.int8)
    swf = w.float().abs().amax(1) / 448
    f8 = (w.float() / swf[:, None]).to(torch.float8_e4m3fn)
    t4 = torch_int4_pack(w4)
    return w, w4, w8, (i8, sw8), (f8, swf), t4


def torch_int4_pack(mod: QuantLinear):
    """torch's tinygemm int4 layout of the same codes: (packed, scales_and_zeros (G, N, 2) bf16) or None."""
    try:
        qw = mod.qweight()
        codes = qw.codes.to(torch.int32)
        u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(u8, 8)
        s = qw.scale.float()
        sz = torch.stack([s, (8 - qw.zero) * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        x = torch.randn(1, mod.k, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, packed, 128, sz)
        return packed, sz
    except Exception as e:                       # noqa: BLE001 - report, don't die
        print(f"torch int4 kernel unavailable: {e}", file=sys.stderr)
        return None


def wbytes(mod: QuantLinear) -> int:
    p = kernels.operands(mod, "triton_gemv")
    return sum(t.numel() * t.element_size() for t in (p.qw, p.scale, p.zero) if t is not None)


def sweep(fn_for_cfg, configs, budget_s: float) -> dict:
    """The fastest config of `configs` (dicts) within `budget_s` seconds: {"us": ..., **config}."""
    best, t0 = None, time.time()
    for cfg in configs:
        if time.time() - t0 > budget_s:
            break
        try:
            us = bench(fn_for_cfg(cfg))
        except Exception as e:                   # noqa: BLE001 - a config that does not compile is skipped
            print(f"config {cfg} failed: {str(e)[:200]}", file=sys.stderr)
            continue
        if best is None or us < best[0]:
            best = (us, cfg)
    return {"us": best[0], **best[1]} if best else {}


def rotated_packs(mod: QuantLinear) -> list:
    return [kernels.operands(copy.deepcopy(mod), "triton_gemv") for _ in range(copies_for(wbytes(mod)))]


def tune_gemv(mod: QuantLinear, m: int, budget_s: float) -> dict:
    x = torch.randn(m, mod.k, device="cuda", dtype=torch.bfloat16)
    packs = rotated_packs(mod)
    default = kernels.gemv_config(m, mod.n, mod.k)
    splits = sorted({1, default["split_k"], 2 * default["split_k"]})
    configs = [{"block_n": bn, "block_g": bg, "split_k": sk, "num_warps": nw}
               for bn, bg, nw, sk in itertools.product((16, 32, 64, 8), (2, 4, 1, 8), (4, 8), splits)]
    return sweep(lambda cfg: [lambda q=q: triton_wq.gemv(x, q, None, **cfg) for q in packs], configs, budget_s)


def tune_gemv1(mod: QuantLinear, budget_s: float) -> dict:
    x = torch.randn(1, mod.k, device="cuda", dtype=torch.bfloat16)
    packs = rotated_packs(mod)
    default = kernels.gemv1_config(mod.n, mod.k, mod.scheme.bits)
    configs = [default] + [{"block_n": bn, "block_g": bg, "split_k": sk, "num_warps": nw}
                           for bn, bg, sk, nw in itertools.product((64, 32, 128), (1, 2, 4), (2, 4, 8, 16), (4, 8))
                           if 256 <= -(-mod.n // bn) * sk <= 8192 and (mod.k // 128) // bg >= sk]
    return sweep(lambda cfg: [lambda q=q: triton_gemv1.gemv1(x, q, None, **cfg) for q in packs], configs, budget_s)


def tune_gemm(mod: QuantLinear, m: int, budget_s: float) -> dict:
    x = torch.randn(m, mod.k, device="cuda", dtype=torch.bfloat16)
    packs = rotated_packs(mod)
    default = kernels.gemm_config(m, mod.n, mod.k, mod.scheme.bits)
    tiles = (((16, 64, 4), (16, 128, 4), (16, 256, 8)) if m <= 16 else ((64, 64, 4), (64, 128, 4), (64, 128, 8))
             if m <= 64 else ((128, 128, 8), (256, 128, 8), (128, 64, 4)))
    configs = [default] + [{"block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": st, "split_k": sk,
                            "block_w": default["block_w"], "asm": asm}
                           for (bm, bn, nw), sk, st, asm in itertools.product(tiles, (1, 2, 4, 8), (3, 4),
                                                                              (True, False))
                           if (mod.k // 128) // sk >= 4]
    return sweep(lambda cfg: [lambda q=q: triton_gemm.gemm(x, q, None, **cfg) for q in packs], configs, budget_s)


def tune_int8(n: int, k: int, m: int, budget_s: float) -> dict:
    w8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    sw = torch.rand(n, device="cuda") * 0.01
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    configs = [{"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": st}
               for bm, bn, bk, nw, st in [(256, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 256, 128, 8, 4),
                                          (256, 128, 128, 8, 4), (128, 128, 128, 8, 4), (128, 128, 256, 8, 3),
                                          (256, 256, 64, 8, 3), (128, 256, 64, 8, 5), (256, 128, 64, 8, 5),
                                          (64, 256, 128, 4, 4), (128, 128, 128, 4, 4), (128, 128, 128, 4, 5)]]
    return sweep(lambda cfg: [lambda: triton_w8a8.int8_fused(x, w8, sw, **cfg)], configs, budget_s)


def run_shape(n: int, k: int, ms: list[int], tuned: dict) -> list[dict]:
    w, w4, w8, (i8, s8), (f8, sf), t4 = make_layers(n, k)
    rows = []
    cb = copies_for(n * k * 2)
    ws = [w.clone() for _ in range(cb)]
    c4 = copies_for(wbytes(w4))
    w4s = [copy.deepcopy(w4) for _ in range(c4)]
    c8 = copies_for(wbytes(w8))
    w8s = [copy.deepcopy(w8) for _ in range(c8)]
    i8s = [(i8.clone(), s8.clone()) for _ in range(copies_for(n * k))]
    f8s = [(f8.clone(), sf.clone()) for _ in range(copies_for(n * k))]
    t4s = [(t4[0].clone(), t4[1].clone()) for _ in range(c4)] if t4 else []
    i8cfg = {kk: v for kk, v in tuned.get(f"int8_{n}x{k}", {}).items() if kk != "us"}
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        r = {"N": n, "K": k, "M": m}
        timed(r, "bf16", [lambda wi=wi: torch.matmul(x, wi.t()) for wi in ws])
        if t4s:
            timed(r, "torch_int4", [lambda p=p: torch._weight_int4pack_mm(x, p[0], 128, p[1]) for p in t4s])
        r["w4_auto_kernel"] = kernels.select(w4s[0], x) or "reference"
        timed(r, "w4_auto", [lambda mm=mm: mm(x) for mm in w4s])
        for name in ("triton_gemv1p", "triton_gemv1h", "triton_gemv1", "triton_gemv", "triton_gemm",
                     "triton_dequant"):
            if name == "triton_gemv" and m > 64 or name == "triton_dequant" and m < 16 or \
                    name.startswith("triton_gemv1") and m > 1:
                continue
            packs = [kernels.operands(mm, "triton_gemm") for mm in w4s]
            if name == "triton_gemv1p":      # the packed-half2 M = 1 GEMV (triton_gemv_h2)
                fns = [lambda p=p, x=x: triton_gemv_h2.gemv1p(x, p, None, **kernels.gemv1p_config(n, k, 4))
                       for p in packs]
            elif name == "triton_gemv1h":
                fns = [lambda p=p, x=x: triton_gemv1.gemv1h(x, p, None, **kernels.gemv1h_config(n, k, 4))
                       for p in packs]
            elif name == "triton_gemv1":     # the previous M = 1 kernel, same run, for before / after
                fns = [lambda p=p: triton_gemv1.gemv1(x, p, None, **kernels.gemv1_config(n, k, 4)) for p in packs]
            elif name == "triton_gemv":
                fns = [lambda p=p: triton_wq.gemv(x, p, None, **kernels.gemv_config(m, n, k)) for p in packs]
            elif name == "triton_gemm":
                fns = [lambda p=p: triton_gemm.gemm(x, p, None, **kernels.gemm_config(m, n, k)) for p in packs]
            else:
                fns = [lambda p=p: triton_gemm.dequant_matmul(x, p, None) for p in packs]
            timed(r, f"w4_{name}", fns)
            if name == "triton_gemm" and kernels.gemm_config(m, n, k).get("tma") and m <= 256:
                cfg = {**kernels.gemm_config(m, n, k), "tma": False}   # the same launch on pointer loads
                timed(r, "w4_triton_gemm_ptr", [lambda p=p, x=x, cfg=cfg: triton_gemm.gemm(x, p, None, **cfg)
                                                for p in packs])
        r["w4_best"] = min([v for kk, v in r.items() if (kk.startswith("w4_triton") or kk == "w4_auto")
                            and isinstance(v, float)] or [math.nan])
        r["w8_auto_kernel"] = kernels.select(w8s[0], x) or "reference"
        timed(r, "w8_auto", [lambda mm=mm: mm(x) for mm in w8s])
        if m == 1:
            packs8 = [kernels.operands(mm, "triton_gemv1") for mm in w8s]
            cfg8 = tuned.get(f"gemv1w8_{n}x{k}") or kernels.gemv1_config(n, k, 8)
            cfg8 = {kk: v for kk, v in cfg8.items() if kk != "us"}
            timed(r, "w8_triton_gemv1", [lambda p=p: triton_gemv1.gemv1(x, p, None, **cfg8) for p in packs8])
            cfg8h = kernels.gemv1h_config(n, k, 8)
            timed(r, "w8_triton_gemv1h", [lambda p=p, x=x, c=cfg8h: triton_gemv1.gemv1h(x, p, None, **c)
                                          for p in packs8])
            cfg8p = kernels.gemv1p_config(n, k, 8)
            timed(r, "w8_triton_gemv1p", [lambda p=p, x=x, c=cfg8p: triton_gemv_h2.gemv1p(x, p, None, **c)
                                          for p in packs8])
        if m <= 64:
            packs8 = [kernels.operands(mm, "triton_gemv") for mm in w8s]
            cfg8 = tuned.get(f"gemv8_{n}x{k}_{m}") or kernels.gemv_config(m, n, k)
            cfg8 = {kk: v for kk, v in cfg8.items() if kk != "us"}
            timed(r, "w8_triton_gemv", [lambda p=p: triton_wq.gemv(x, p, None, **cfg8) for p in packs8])
        if m >= 16:
            timed(r, "w8a8_int8_fused", [lambda p=p: triton_w8a8.int8_fused(x, p[0], p[1], **i8cfg) for p in i8s])
            if m > 16:
                timed(r, "w8a8_int8_intmm", [lambda p=p: triton_w8a8.int8_intmm(x, p[0], p[1]) for p in i8s])
            timed(r, "w8a8_fp8", [lambda p=p: triton_w8a8.fp8_scaled_mm(x, p[0], p[1]) for p in f8s])
        r["w4_bytes"] = wbytes(w4) + 2 * m * (k + n)
        r["w8_bytes"] = wbytes(w8) + 2 * m * (k + n)
        r["bf16_bytes"] = 2 * n * k + 2 * m * (k + n)
        rows.append(r)
        print(json.dumps(r), flush=True)
    del ws, w4s, w8s, i8s, f8s, t4s
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], copy_bps: float) -> str:
    def sp(r, key):
        return f"{r['bf16'] / r[key]:.2f}x" if key in r else "-"

    def us(r, key):
        return f"{r[key]:.1f}" if key in r else "-"

    out = ["| N x K | M | bf16 us | torch int4 us | W4 auto us (kernel) | W4 x bf16 | W4 best us | W4 GB/s (% copy) "
           "| W8 us | W8 x bf16 | W8A8 int8 us | x bf16 | FP8 us | x bf16 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r.setdefault("bf16", math.nan)
        r.setdefault("w4_auto", math.nan)
        gbs = r["w4_bytes"] / (r["w4_auto"] * 1e-6) / 1e9
        w8 = r.get("w8_auto", math.inf)         # what dispatch runs (the forced rows are in the JSON)
        if w8 < math.inf:
            r["w8_best"] = w8
        i8 = min(r.get("w8a8_int8_fused", math.inf), r.get("w8a8_int8_intmm", math.inf))
        if i8 < math.inf:
            r["w8a8_best"] = i8
        out.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['bf16']:.1f} | {us(r, 'torch_int4')} | "
                   f"{r['w4_auto']:.1f} ({r['w4_auto_kernel']}) | {sp(r, 'w4_auto')} | {r['w4_best']:.1f} | "
                   f"{gbs:.0f} ({100 * gbs * 1e9 / copy_bps:.0f}%) | {us(r, 'w8_best')} | {sp(r, 'w8_best')} | "
                   f"{us(r, 'w8a8_best')} | {sp(r, 'w8a8_best')} | {us(r, 'w8a8_fp8')} | {sp(r, 'w8a8_fp8')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--tune", action="store_true", help="sweep GEMV/GEMM launch configs first")
    ap.add_argument("--tune-budget", type=float, default=20.0, help="seconds per tuned (shape, M)")
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--shapes", help="e.g. 4096x4096,8192x28672")
    ap.add_argument("--ms", help="e.g. 1,16")
    a = ap.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")] if a.shapes else SHAPES
    if a.quick:
        shapes = [(4096, 4096), (8192, 28672)]
    ms = [int(v) for v in a.ms.split(",")] if a.ms else MS
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__}
    copy_bps = copy_rate()
    info["copy_GBps"] = copy_bps / 1e9
    print(json.dumps(info), flush=True)
    tuned: dict = {}
    if a.tune:
        for n, k in shapes:
            _, w4, w8, *_ = make_layers(n, k)
            if 1 in ms:
                tuned[f"gemv1w4_{n}x{k}_1"] = tune_gemv1(w4, a.tune_budget)
                tuned[f"gemv1w8_{n}x{k}"] = tune_gemv1(w8, a.tune_budget / 2)
            for m in (1, 4):
                if m in ms:
                    tuned[f"gemv4_{n}x{k}_{m}"] = tune_gemv(w4, m, a.tune_budget)
                    tuned[f"gemv8_{n}x{k}_{m}"] = tune_gemv(w8, m, a.tune_budget / 2)
            for m in (16, 64, 256):
                if m in ms:
                    tuned[f"gemm4_{n}x{k}_{m}"] = tune_gemm(w4, m, a.tune_budget)
            if 2048 in ms and n * k >= 2**27:
                tuned[f"int8_{n}x{k}"] = tune_int8(n, k, 2048, a.tune_budget)
            for key, cfg in tuned.items():       # the module's own dispatch uses the winners too
                name, shape, *mm = key.split("_")
                if cfg and name in ("gemv4", "gemm4", "gemv1w4") and shape == f"{n}x{k}":
                    kern = {"gemv4": "triton_gemv", "gemm4": "triton_gemm", "gemv1w4": "triton_gemv1"}[name]
                    kernels.TUNED[kern, n, k, int(mm[0])] = {kk: v for kk, v in cfg.items() if kk != "us"}
            print(json.dumps({kk: v for kk, v in tuned.items() if f"{n}x{k}" in kk}), flush=True)
            del w4, w8
            torch.cuda.empty_cache()
    rows = []
    for n, k in shapes:
        rows += run_shape(n, k, ms, tuned)
        if a.json:                               # after every shape, so a cut-off run keeps what it measured
            Path(a.json).write_text(json.dumps({"info": info, "tuned": tuned, "rows": rows}, indent=1))
    t = table(rows, copy_bps)
    print(f"\ncopy rate {copy_bps / 1e9:.0f} GB/s (read + write), {info}\n")
    print(t)


if __name__ == "__main__":
    main()
