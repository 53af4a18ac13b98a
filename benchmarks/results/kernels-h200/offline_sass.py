"""Compile bitsmith's weight-only Triton kernels for sm_90 on a machine WITHOUT a GPU and count the SASS
instructions per code of their main loops: catches compile errors and shows where instructions go before any
device time is spent (session 7). Needs triton (which bundles ptxas and nvdisasm), not CUDA:

    python -m pip install --target /tmp/tsite triton==3.6.0
    PYTHONPATH=/tmp/tsite python benchmarks/results/kernels-h200/offline_sass.py [--dump DIR]

Prints, per launch (the dispatch rules' M = 1 gemv1p and M = 16 / 64 GEMM launches at 4 bits on the issue's
large shapes), each loop's instruction count, instructions per code, and its most frequent opcodes. The first
loop printed is the K loop; later ones (LDG / STG / FADD heavy) are the split-K epilogue's.
Session 7's reading: gemv1p 2.91 per code (floor of its half2 scheme ~1.6); the GEMM's K loop 5.6 per code at
M = 16 and 64 (dequantization 1.9, PRMT code interleave 0.5, HMUL2 scales 0.5, address IMADs 0.6), about twice
gemv1p's, as its time at M = 16 is (74-77 vs 36-39 us): issue-bound, not load-bound. With scale_after
(scales on each step's product): 4.1 at M = 16, 4.6 at M = 64 (untimed).
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bitsmith import kernels  # noqa: E402
from bitsmith.kernels import triton_gemm, triton_gemv_h2  # noqa: E402

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, sig: dict, consts: dict, **opts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    return triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=opts)


def loop_bodies(sass: str) -> list[list[str]]:
    """Instruction lists of the backward-branch loops in nvdisasm output."""
    labels, instr = {}, []
    for line in sass.splitlines():
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(instr)
            continue
        m = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            instr.append(m.group(1))
    bodies = []
    for i, ins in enumerate(instr):
        m = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            bodies.append(instr[labels[m.group(1)]:i + 1])
    return bodies


def report(name: str, k, codes_per_iter: int, dump: Path | None) -> None:
    cubin = Path("/tmp") / f"{name}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    sass = subprocess.run([str(NVDISASM), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    if dump:
        (dump / f"{name}.sass").write_text(sass)
    print(f"{name}: {k.metadata.num_warps} warps, {k.metadata.shared} B shared")
    for body in loop_bodies(sass):
        if len(body) < 50:
            continue
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0] for b in body)
        print(f"  loop: {len(body)} instructions / {codes_per_iter} codes per thread = "
              f"{len(body) / codes_per_iter:.2f} per code; " + ", ".join(f"{o} {c}" for o, c in ops.most_common(12)))


def gemv1p(n: int, k: int, dump: Path | None, pdl: int = -1, bits: int = 4) -> None:
    """pdl >= 0: the programmatic-dependent-launch variant with that many steps prefetched to L2."""
    cfg = kernels.gemv1p_config(n, k, bits)
    bn, bw, warps = cfg["block_n"], cfg["block_w"], cfg["num_warps"]
    qw = f"tensordesc<i32[{bn}, {bw}]>" if cfg.get("tma") else "*i32"
    sig = {"X": "*bf16", "QW": qw, "S": "*fp16", "Z": "*fp16", "B": "*fp16", "Y": "*bf16", "WS": "*fp32",
           "CNT": "*i32", "N": "i32", "K": "i32", "wpr": "i32", "QP": "*i32"}
    consts = dict(BITS=bits, GS=128 if bits == 4 else k, HAS_ZERO=bits == 4, HAS_BIAS=False, BLOCK_N=bn,
                  BLOCK_W=bw, SPLIT_K=cfg["split_k"], EVEN=True, FP16=False, PIPE=cfg.get("pipe", 0),
                  TMA=bool(cfg.get("tma")), PDL=2 if pdl >= 0 else 0, PREFETCH=max(pdl, 0))
    kern = compile_kernel(triton_gemv_h2._wq_gemv1p_kernel, sig, consts, num_warps=warps, launch_pdl=pdl >= 0)
    report(f"gemv1p_{n}x{k}_w{bits}" + (f"_pdl{pdl}" if pdl >= 0 else ""), kern, bn * bw * 32 // bits // (32 * warps),
           dump)


def gemm(m: int, n: int, k: int, dump: Path | None, scale_after: bool = False, kperm: int = 0) -> None:
    cfg = kernels.gemm_config(m, n, k, 4)
    bm, bn, bw, warps = cfg["block_m"], cfg["block_n"], cfg["block_w"], cfg["num_warps"]
    if cfg["tma"]:
        x, qw = f"tensordesc<bf16[{bm}, {bw * 8}]>", f"tensordesc<i32[{bn}, {bw}]>"
    else:
        x, qw = "*bf16", "*i32"
    sig = {"X": x, "QW": qw, "S": "*fp16", "Z": "*fp16", "B": "*fp16", "Y": "*bf16", "WS": "*fp32", "CNT": "*i32",
           "M": "i32", "N": "i32", "K": "i32", "wpr": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    consts = dict(BITS=4, GS=128, HAS_ZERO=True, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw,
                  SPLIT_K=cfg["split_k"], ASM=True, EVEN=True, FP16=False, TMA=cfg["tma"], SCALE_AFTER=scale_after,
                  KPERM=kperm)
    kern = compile_kernel(triton_gemm._wq_gemm_kernel, sig, consts, num_warps=warps, num_stages=cfg["num_stages"])
    report(f"gemm_m{m}_{n}x{k}" + ("_scale_after" if scale_after else "") + (f"_kperm{kperm}" if kperm else ""), kern, bn * bw * 8 // (32 * warps), dump)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", type=Path, help="also write each launch's SASS into this folder")
    ap.add_argument("--pdl", action="store_true", help="only the M = 1 launches, with and without PDL")
    ap.add_argument("--kperm", action="store_true", help="only the GEMM launches, with and without kperm")
    args = ap.parse_args()
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
    if args.pdl:
        for n, k in [(4096, 4096), (28672, 4096)]:
            for bits in (4, 8):
                for pdl in (-1, 0, 2):
                    gemv1p(n, k, args.dump, pdl, bits)
        return
    if args.kperm:
        for n, k in [(28672, 8192), (4096, 4096)]:
            for m in (16, 64, 256, 2048):
                for sa in (False, True) if m <= 64 else (False,):
                    for kp in (0, 1, 2):
                        gemm(m, n, k, args.dump, sa, kperm=kp)
        return
    for n, k in [(28672, 8192), (8192, 28672)]:
        gemv1p(n, k, args.dump)
        for m in (16, 64):
            gemm(m, n, k, args.dump)
            gemm(m, n, k, args.dump, scale_after=True)


if __name__ == "__main__":
    main()
