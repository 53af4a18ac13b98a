"""The bf16 GEMM case that failed once on the device (K=576, act-order, int4 g32 sym; and g128 asym) on 240
fresh inputs each, with this tree's GEMM and the one before this session's shared scale loader, same inputs:
do they agree bit for bit, and how often does each exceed the tests' bound? Needs _wq_before.py beside this
file (not committed): `git show 9c2a919:bitsmith/kernels/triton_wq.py`, with `from .layout` made
`from bitsmith.kernels.layout`."""
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _wq_before as OLD

from bitsmith import kernels
from bitsmith.kernels import reference
from bitsmith.kernels import triton_gemm as NEW
from bitsmith.recipe import Scheme
from tests.test_kernels import make_layer

for k, scheme in ((576, Scheme(bits=4, group_size=32, symmetric=True)), (576, Scheme(bits=4, group_size=128))):
    mod, qw = make_layer(k, scheme, True, seed=k)
    mod = mod.cuda()
    qw = dataclasses.replace(qw, codes=qw.codes.cuda(), scale=qw.scale.cuda(), zero=None if qw.zero is None else qw.zero.cuda(),
                             perm=qw.perm.cuda())
    p = kernels.operands(mod, "triton_gemm")
    out = {"new_fail": 0, "old_fail": 0, "differ": 0, "new_max": 0.0, "old_max": 0.0, "cases": 0}
    for trial in range(60):
        for m in (1, 3, 17, 64):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = reference.weight_only_linear(x.float(), qw, mod.bias).float()
            cfg = kernels.gemm_config(m, mod.n, mod.k, 4)
            b = mod.bias.to(torch.bfloat16)
            yn = NEW.gemm(x, p, b, **cfg).float()
            yo = OLD.gemm(x, p, b, **cfg).float()
            tol = 1e-2 * ref.abs() + 1e-2 * ref.pow(2).mean().sqrt()
            out["new_fail"] += int(((yn - ref).abs() > tol).any())
            out["old_fail"] += int(((yo - ref).abs() > tol).any())
            out["differ"] += int(not torch.equal(yn, yo))
            out["new_max"] = max(out["new_max"], float(((yn - ref).abs() / tol).max()))
            out["old_max"] = max(out["old_max"], float(((yo - ref).abs() / tol).max()))
            out["cases"] += 1
    print(scheme.label(), k, out, flush=True)
