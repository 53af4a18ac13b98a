"""CPU weight-only kernels per layer (issue 8): SmolLM2-135M's linear shapes at small M, fp32 F.linear vs each
bitsmith CPU kernel forced through QuantLinear (cpu_fused, cpu_int8 / cpu_int4, the reference), microseconds
per call with the weights rotated through ~200 MB so that they come from DRAM as in decode.

    OMP_NUM_THREADS=2 python -P benchmarks/cpu_kernels.py [--threads 2] [--ms 1,4,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bitsmith import kernels  # noqa: E402
from bitsmith.nn import QuantLinear  # noqa: E402
from bitsmith.primitives import quantize_weight  # noqa: E402
from bitsmith.recipe import Scheme  # noqa: E402

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))      # q/o, k/v, gate/up, down (N, K)
SCHEMES = {"W8": Scheme(bits=8, group_size=None, symmetric=True), "W4 g64": Scheme(bits=4, group_size=64),
           "W3 g64": Scheme(bits=3, group_size=64), "W2 g64": Scheme(bits=2, group_size=64)}
ROTATE_BYTES = 200e6


def timed(fns: list, reps: int) -> float:
    """Median over 5 rounds of microseconds per call, each round one pass over the rotated copies."""
    for f in fns[:3]:
        f()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            for f in fns:
                f()
        rounds.append((time.perf_counter() - t) / reps / len(fns) * 1e6)
    return sorted(rounds)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ms", default="1,4,8")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for n, k in SHAPES:
            copies = max(1, int(ROTATE_BYTES // (n * k * 4)))
            ws = [torch.randn(n, k) * 0.02 for _ in range(copies)]
            mods = {label: [QuantLinear.from_qweight(quantize_weight(w, sch)) for w in ws]
                    for label, sch in SCHEMES.items()}
            for m in map(int, a.ms.split(",")):
                x = torch.randn(m, k)
                fp32 = timed([lambda w=w: F.linear(x, w) for w in ws], a.reps)
                row = {"N": n, "K": k, "M": m, "fp32": fp32}
                for label, ms in mods.items():
                    for name in ("cpu_fused", "cpu_int8", "cpu_int4", "reference"):
                        kernels.set_policy(name)
                        try:
                            if name != "reference" and kernels.select(ms[0], x) != name:
                                continue                       # this kernel cannot run this scheme here
                            row[f"{label} {name}"] = timed([lambda q=q: q(x) for q in ms], a.reps)
                        finally:
                            kernels.set_policy(None)
                rows.append({key: round(v, 1) if isinstance(v, float) else v for key, v in row.items()})
                print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"threads": a.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
