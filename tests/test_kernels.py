"""Every kernel against kernels/reference.py: M in {1, 3, 17, 64}, K in {576, 1536, 4096}, with and without
act-order. Outputs must match within rtol 1e-2 (plus a small absolute floor scaled to the output's RMS,
for entries near zero) and have cosine similarity >= 0.9999. GPU kernels skip without CUDA/triton."""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import partial
import subprocess
import sys

import pytest
import torch

from bitsmith import kernels
from bitsmith.kernels import layout, reference
from bitsmith.nn import QuantLinear
from bitsmith.packing import unpack
from bitsmith.primitives import dequantize_weight, quantize_weight
from bitsmith.recipe import Scheme

MS = (1, 3, 17, 64)
KS = (576, 1536, 4096)
N = 80                      # not a multiple of the GPU block sizes (torch's CPU int4 needs N % 16 == 0)
CUDA = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")


def assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    y, ref = y.float(), ref.float()
    assert torch.isfinite(y).all()
    rms = ref.pow(2).mean().sqrt()
    bad = (y - ref).abs() > 1e-2 * ref.abs() + 1e-2 * rms
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} entries off; max err {float((y - ref).abs().max())}"
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert cos >= 0.9999, f"cosine {float(cos)}"


def make_layer(k: int, scheme: Scheme, act_order: bool, seed: int = 0, n: int = N, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qw = quantize_weight(w, scheme)
    if act_order:
        qw = dataclasses.replace(qw, perm=torch.randperm(k, generator=g).to(torch.int32))
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_qweight(qw, b), qw


def make_input_scaled_layer(k: int, scheme: Scheme, seed: int):
    """An AWQ-style layer with a run-time input scale (InputScaledLinear) over act-ordered codes; also
    returns the generator, which the caller keeps drawing its inputs from."""
    from bitsmith.nn import InputScaledLinear
    from bitsmith.primitives import QWeight

    _, qw = make_layer(k, scheme, act_order=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    scale = {"input_scale": torch.rand(k, generator=g) + 0.5}
    qw = QWeight(qw.codes, qw.scale, qw.zero, qw.scheme, qw.perm, scale)
    mod = QuantLinear.from_qweight(qw, torch.randn(N, generator=g))
    assert isinstance(mod, InputScaledLinear)
    return mod, qw, g


def gpu_pack(mod: QuantLinear):
    zero = None if mod.zero_kind == "none" else unpack(mod.qzero, mod.scheme.bits, mod.n_groups).float()
    return layout.build(mod.qcodes, mod.scale, zero, getattr(mod, "perm", None), mod.scheme, mod.n, mod.k)


# ---- layout (pure torch, runs everywhere) ---------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, 64, True), (8, None, True), (8, 32, False)])
@pytest.mark.parametrize("k", KS)
def test_layout_decodes_bit_exactly(bits, group, sym, k):
    """The int32 words, re-laid scales and zeros describe exactly the stored weight (ragged groups too)."""
    mod, qw = make_layer(k, Scheme(bits=bits, group_size=group, symmetric=sym), act_order=True, bias=False)
    p = gpu_pack(mod)
    cpw = 32 // bits
    shifts = torch.arange(cpw, dtype=torch.int32) * bits
    codes = ((p.qw.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(mod.n, k).float()     # (N, K)
    s = p.scale.float().t().repeat_interleave(p.group, 1)                                     # (N, K)
    z = (1 << (bits - 1)) if p.zero is None else p.zero.float().t().repeat_interleave(p.group, 1)
    w = torch.empty(mod.n, k).index_copy_(1, p.perm.long(), (codes - z) * s)
    assert torch.equal(w, dequantize_weight(qw))
    assert p.qw.data_ptr() == mod.qcodes.data_ptr()          # codes are a view, never a copy
    wpr = k // cpw                                            # x_pi: position i * wpr + j <- code i of word j
    pos = torch.arange(k)
    assert torch.equal(p.xidx, p.perm.long()[cpw * (pos % wpr) + pos // wpr])


def test_layout_refuses_what_it_cannot_run():
    assert "grid nf4" in layout.unsupported_reason(8, 64, Scheme(bits=4, grid="nf4"), "none", {})
    assert "3-bit" in layout.unsupported_reason(8, 64, Scheme(bits=3), "packed", {})
    assert "32-bit words" in layout.unsupported_reason(8, 100, Scheme(bits=4, group_size=None), "packed", {})
    assert layout.unsupported_reason(8, 576, Scheme(bits=4, group_size=128), "packed", {}) is None


# ---- CPU kernels -----------------------------------------------------------------------------------------
CPU_SCHEMES = [("cpu_int4", Scheme(bits=4, group_size=64)), ("cpu_int4", Scheme(bits=4, group_size=32, symmetric=True)),
               ("cpu_int8", Scheme(bits=8, group_size=None, symmetric=True)), ("cpu_int8", Scheme(bits=8, group_size=None))]


@pytest.mark.skipif(any(kernels.cpu.missing_ops().values()), reason="torch build lacks the CPU int kernels")
@pytest.mark.parametrize("name,scheme", CPU_SCHEMES, ids=lambda v: v if isinstance(v, str) else v.label())
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k", KS)
def test_cpu_kernels_match_reference(name, scheme, act_order, k):
    mod, qw = make_layer(k, scheme, act_order, seed=k)
    for m in MS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        assert kernels.select(mod, x) == (cpu_auto(name) if m <= kernels.CPU_MAX_M else None)
        assert_matches(kernels.run(mod, x, name), reference.weight_only_linear(x, qw, mod.bias))
    xb = torch.randn(3, k).to(torch.bfloat16)                                      # bf16 activations
    assert_matches(kernels.run(mod, xb, name), reference.weight_only_linear(xb, qw, mod.bias))


def cpu_auto(name: str) -> str:
    """What auto dispatch picks on the CPU for a layer both `name` and cpu_fused can run: the fused kernel
    first, when Inductor can compile here (tests/test_cpu_fused.py tests it)."""
    return "cpu_fused" if kernels.available()["cpu_fused"] is None else name


# ---- dispatch ------------------------------------------------------------------------------------------
def test_dispatch_is_explicit_and_inspectable():
    mod, _ = make_layer(576, Scheme(bits=4, group_size=64), act_order=False)
    x = torch.randn(2, 576)
    verdict = kernels.explain(mod, x)
    assert set(kernels.KERNELS) <= set(verdict)
    if kernels.available()["cpu_int4"] is None:
        assert verdict[cpu_auto("cpu_int4")] == "chosen"
    assert "W8A8" in verdict["w8a8_int8"] or "CUDA" in verdict["w8a8_int8"]
    nf4, _ = make_layer(576, Scheme(bits=4, group_size=64, grid="nf4"), act_order=False)
    assert kernels.select(nf4, x) is None and "grid nf4" in kernels.explain(nf4, x)["cpu_int4"]
    kernels.set_policy("reference")
    try:
        assert kernels.select(mod, x) is None and kernels.explain(mod, x)["reference"] == "chosen"
    finally:
        kernels.set_policy(None)
    with pytest.raises(ValueError, match="unknown kernel policy"):
        kernels.set_policy("fastest")


@pytest.mark.skipif(kernels.cpu.missing_ops()["cpu_int4"] is not None, reason="no CPU int4 kernel")
def test_kernel_cache_stays_out_of_checkpoints_and_follows_the_codes():
    mod, _ = make_layer(576, Scheme(bits=4, group_size=64), act_order=True)
    other, qw2 = make_layer(576, Scheme(bits=4, group_size=64), act_order=True, seed=1)
    x = torch.randn(3, 576)
    mod(x)
    assert any(name.startswith("_kernel_") for name, _ in mod.named_buffers())
    assert not any(key.startswith("_kernel_") for key in mod.state_dict())
    mod.load_state_dict(other.state_dict())                 # in-place copy: the cache must be rebuilt
    assert_matches(mod(x), reference.weight_only_linear(x, qw2, other.bias))


def test_import_bitsmith_does_not_import_triton():
    code = "import sys, torch, bitsmith, bitsmith.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- GPU kernels (skip without CUDA) --------------------------------------------------------------------
GPU_SCHEMES = [Scheme(bits=4, group_size=128), Scheme(bits=4, group_size=32, symmetric=True),
               Scheme(bits=8, group_size=None, symmetric=True), Scheme(bits=8, group_size=128)]


@gpu
@pytest.mark.parametrize("name", ["triton_gemv1", "triton_gemv1h", "triton_gemv1p", "triton_gemv",
                                  "triton_gemm", "triton_dequant"])
@pytest.mark.parametrize("scheme", GPU_SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_weight_only_kernels_match_reference(name, scheme, act_order, k, dtype):
    mod, qw = make_layer(k, scheme, act_order, seed=k)
    mod = mod.cuda()
    qw = dataclasses.replace(qw, codes=qw.codes.cuda(), scale=qw.scale.cuda(),
                             zero=None if qw.zero is None else qw.zero.cuda(),
                             perm=None if qw.perm is None else qw.perm.cuda())
    for m in (1,) if name in kernels.M1_KERNELS else MS:
        x = torch.randn(m, k, device="cuda").to(dtype)
        y = kernels.run(mod, x, name)
        ref = reference.weight_only_linear(x, qw, mod.bias)
        if dtype == torch.float16:
            assert_matches(y, ref)
        else:       # bf16 activations: the reference rounds W to bf16 too; same bounds on the fp32 result
            assert_matches(y, reference.weight_only_linear(x.float(), qw, mod.bias))


@gpu
@pytest.mark.parametrize("m", [1, 17, 96])
def test_awq_input_scaled_layers_take_the_gpu_kernels(m):
    """AWQ's run-time input scale: the module scales x itself (BEFORE_KERNEL), then dispatch runs the codes
    as an ordinary weight; act-order on top."""
    mod, qw, g = make_input_scaled_layer(1536, Scheme(bits=4, group_size=128), seed=9)
    x = torch.randn(m, 1536, generator=g)
    ref = reference.weight_only_linear(x, qw, mod.bias)
    mod, xc = mod.cuda(), x.cuda().to(torch.float16)
    assert kernels.select(mod, xc * mod.input_scale.half()) is not None
    assert_matches(mod(xc).cpu(), ref)


@gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gemv1_split_k_is_deterministic_and_reusable(act_order, bits):
    """The split-K GEMV reduces its partials in the last program of each row block and resets the block's
    counter: every split and tile matches the reference, and a repeated call gives the same bits."""
    from bitsmith.kernels import triton_gemv1
    mod, qw = make_layer(4096, Scheme(bits=bits, group_size=128), act_order, seed=3, n=200)
    mod = mod.cuda()
    qw = dataclasses.replace(qw, codes=qw.codes.cuda(), scale=qw.scale.cuda(), zero=qw.zero.cuda(),
                             perm=None if qw.perm is None else qw.perm.cuda())
    pack = kernels.operands(mod, "triton_gemv1")
    x = torch.randn(1, 4096, device="cuda").to(torch.float16)
    ref = reference.weight_only_linear(x, qw, mod.bias)
    for split, block_n, block_g in [(1, 32, 2), (2, 16, 1), (3, 32, 4), (8, 64, 2), (16, 8, 2), (1, 128, 1)]:
        cfg = {"split_k": split, "block_n": block_n, "block_g": block_g}
        y1 = triton_gemv1.gemv1(x, pack, mod.bias.half(), **cfg)
        y2 = triton_gemv1.gemv1(x, pack, mod.bias.half(), **cfg)
        assert_matches(y1, ref)
        assert torch.equal(y1, y2), cfg
        for ws, cnt in pack.scratch.values():
            assert int(cnt.abs().sum()) == 0         # every row block's counter is back at zero
    # the half-conversion GEMV: ragged row blocks (200 rows), uneven splits, K steps of 8..64 words
    for split, block_n, block_w, warps in [(1, 32, 16, 4), (3, 64, 8, 4), (8, 256, 16, 4), (16, 128, 32, 8),
                                           (5, 128, 64, 4), (8, 64, 16, 1)]:
        cfg = {"split_k": split, "block_n": block_n, "block_w": block_w, "num_warps": warps}
        y1 = triton_gemv1.gemv1h(x, pack, mod.bias.half(), **cfg)
        y2 = triton_gemv1.gemv1h(x, pack, mod.bias.half(), **cfg)
        assert_matches(y1, ref)
        assert torch.equal(y1, y2), cfg
        assert all(int(cnt.abs().sum()) == 0 for _, cnt in pack.scratch.values())
    # the packed-half2 GEMV: the same splits and tiles, 4-word units (K steps of 4..32 words)
    from bitsmith.kernels import triton_gemv_h2
    for split, block_n, block_w, warps, pipe in [(1, 32, 16, 1, 0), (3, 64, 8, 1, 0), (8, 64, 16, 1, 0),
                                                 (16, 128, 32, 2, 0), (5, 128, 4, 4, 0), (2, 256, 16, 8, 0),
                                                 (3, 64, 16, 1, 3), (8, 64, 32, 1, 4), (1, 32, 16, 1, 3)]:
        for tma in (False, True) if pipe else (False,):     # the copy engine's word tiles, same pipeline
            cfg = {"split_k": split, "block_n": block_n, "block_w": block_w, "num_warps": warps, "pipe": pipe,
                   "tma": tma}
            y1 = triton_gemv_h2.gemv1p(x, pack, mod.bias.half(), **cfg)
            y2 = triton_gemv_h2.gemv1p(x, pack, mod.bias.half(), **cfg)
            assert_matches(y1, ref)
            assert torch.equal(y1, y2), cfg
            assert all(int(cnt.abs().sum()) == 0 for _, cnt in pack.scratch.values())
    for split, block_n, block_w, warps in [(8, 64, 16, 1), (3, 128, 32, 4), (1, 32, 8, 1)]:
        cfg = {"split_k": split, "block_n": block_n, "block_w": block_w, "num_warps": warps, "pipe": 4, "tma": True}
        y1 = triton_gemv_h2.gemv1p(x, pack, mod.bias.half(), **cfg)
        y2 = triton_gemv_h2.gemv1p(x, pack, mod.bias.half(), **cfg)
        assert_matches(y1, ref)
        assert torch.equal(y1, y2), cfg
        assert all(int(cnt.abs().sum()) == 0 for _, cnt in pack.scratch.values())


@gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv1p_programmatic_dependent_launch_chains_correctly(bits):
    """gemv1p launched with PDL (programs scheduled while the kernel before runs, waiting for it before
    reading x): a chain of layers, each reading the one before's output, matches the reference eagerly and
    replayed from a CUDA graph, with and without weights prefetched to L2 before the wait."""
    from bitsmith.kernels import triton_gemv_h2, triton_wq
    if triton_wq.pdl_reason(torch.device("cuda")) is not None:
        pytest.skip(triton_wq.pdl_reason(torch.device("cuda")))
    layers = []
    for seed in range(3):
        mod, qw = make_layer(2048, Scheme(bits=bits, group_size=128), False, seed=10 + seed, n=2048)
        mod = mod.cuda()
        qw = dataclasses.replace(qw, codes=qw.codes.cuda(), scale=qw.scale.cuda(), zero=qw.zero.cuda())
        layers.append((kernels.operands(mod, "triton_gemv1p"), qw))
    x = torch.randn(1, 2048, device="cuda").to(torch.float16)
    refs, h = [], x
    for _, qw in layers:
        h = reference.weight_only_linear(h, qw, None)
        h = h / h.abs().max()                  # keep the chain's activations in range (the same op below)
        refs.append(h)
    for cfg in [{"block_n": 64, "block_w": 16, "split_k": 4, "pipe": 3, "tma": True, "prefetch": 2},
                {"block_n": 64, "block_w": 16, "split_k": 2, "pipe": 3, "tma": True, "prefetch": 0,
                 "pdl_trigger": "start"},
                {"block_n": 32, "block_w": 16, "split_k": 3, "pipe": 3, "tma": True, "prefetch": 8},
                {"block_n": 64, "block_w": 32, "split_k": 2}, {"block_n": 64, "block_w": 32, "pdl_trigger": "start"}]:
        def chain():
            outs, h = [], x
            for pack, _ in layers:
                h = triton_gemv_h2.gemv1p(h, pack, None, **cfg, pdl=True)
                h = h / h.abs().max()
                outs.append(h)
            return outs
        for out, ref in zip(chain(), refs):
            assert_matches(out, ref)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = chain()
        for _ in range(3):
            g.replay()
            torch.cuda.synchronize()
            for out, ref in zip(outs, refs):
                assert_matches(out, ref)


@gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv1p_keeps_large_and_small_activations(bits, dtype):
    """The half2 GEMV scales x per 4-word unit by a power of two: activations near the fp16 limit (bf16: far
    past it) and tiny ones (fp16 subnormal range) must give the reference's result, not inf or zeros."""
    from bitsmith.kernels import triton_gemv_h2
    mod, qw = make_layer(4096, Scheme(bits=bits, group_size=128), False, seed=7, n=128)
    mod = mod.cuda()
    qw = dataclasses.replace(qw, codes=qw.codes.cuda(), scale=qw.scale.cuda(), zero=qw.zero.cuda())
    pack = kernels.operands(mod, "triton_gemv1p")
    big = 200.0 if dtype == torch.float16 else 1e6   # fp16: |x| ~ 800 (16 x 15 x 800 overflows fp16 sums
                                                   # unscaled) with outputs still inside fp16's range
    for mag in (big, 1e-5, 1.0):
        x = torch.randn(1, 4096, device="cuda") * mag
        x[0, ::97] *= 40 if dtype == torch.bfloat16 else 1     # outliers (bf16 only: fp16 would overflow)
        x = x.to(dtype)
        y = triton_gemv_h2.gemv1p(x, pack, None)
        assert_matches(y, reference.weight_only_linear(x.float(), qw, None))


@gpu
def test_quantlinear_on_cuda_dispatches_by_m():
    mod, _ = make_layer(4096, Scheme(bits=4, group_size=128), act_order=False)
    mod = mod.cuda()
    picks = {m: kernels.select(mod, torch.randn(m, 4096, device="cuda", dtype=torch.float16)) for m in (1, 8, 64)}
    assert picks == {1: "triton_gemv1p", 8: "triton_gemm", 64: "triton_gemm"}
    _, qw = make_layer(4096, Scheme(bits=4, group_size=128), act_order=False)
    frac = QuantLinear.from_qweight(dataclasses.replace(qw, zero=qw.zero + 0.5)).cuda()   # HQQ-like zeros
    assert frac.zero_kind == "float16"                                     # gemv1p needs integer zeros
    assert kernels.select(frac, torch.randn(1, 4096, device="cuda", dtype=torch.float16)) == "triton_gemv1"


def test_weight_only_choice_follows_the_measured_crossovers():
    assert kernels.weight_only_choice(1, 28672, 8192) == "triton_gemv1p"
    assert kernels.weight_only_choice(1, 1024, 4096, bits=8) == "triton_gemv1"
    assert kernels.weight_only_choice(1, 4096, 4096, bits=8) == "triton_gemv1p"
    # gemv1p: 64 rows x 32-word steps split to >= 768 programs; 32 x 16 where that cannot reach them
    # 8 bits: 64 rows x 32-word steps split to >= 768 programs; 32 x 16 where that cannot reach them
    assert kernels.gemv1p_config(28672, 8192, 8) == {"block_n": 64, "block_w": 32, "split_k": 2, "num_warps": 1}
    assert kernels.gemv1p_config(14336, 4096, 8) == {"block_n": 64, "block_w": 32, "split_k": 4,
                                                     "num_warps": 1}
    assert kernels.gemv1p_config(1024, 4096, 8) == {"block_n": 32, "block_w": 16, "split_k": 16, "num_warps": 1}
    # 4 bits: 16-word steps through the copy engine, split to >= 768 programs, from 512 programs up
    tma = {"block_n": 64, "block_w": 16, "num_warps": 1, "pipe": 3, "tma": True}
    assert kernels.gemv1p_config(28672, 8192) == {**tma, "split_k": 2}
    assert kernels.gemv1p_config(8192, 28672) == {**tma, "split_k": 8}
    assert kernels.gemv1p_config(4096, 4096) == {**tma, "split_k": 8}
    assert kernels.gemv1p_config(14336, 4096) == {**tma, "split_k": 4}
    assert kernels.gemv1p_config(128256, 4096)["split_k"] == 1
    assert "tma" not in kernels.gemv1p_config(1024, 4096)          # 128 programs: the pointer launch
    assert kernels.weight_only_choice(4, 4096, 14336) == "triton_gemm"
    assert kernels.weight_only_choice(64, 4096, 4096) == "triton_gemm"
    assert kernels.weight_only_choice(256, 4096, 4096) == "triton_dequant"
    assert kernels.weight_only_choice(256, 28672, 8192) == "triton_gemm"          # 4 bits, >= 2^25 weights
    assert kernels.weight_only_choice(256, 4096, 14336) == "triton_gemm"
    assert kernels.weight_only_choice(256, 28672, 8192, bits=8) == "triton_dequant"
    assert kernels.weight_only_choice(2048, 8192, 28672) == "triton_dequant"
    assert kernels.gemv_config(1, 8192, 28672)["split_k"] == 4 and kernels.gemv_config(1, 28672, 8192)["split_k"] == 1
    # the GEMM splits K to fill the GPU without overshooting it (4 bits: at most 1024 / 256 programs at
    # M <= 16 / 64, 8 / 4 groups of 128 per split), never below 4 groups of 128 per split
    shapes = [(28672, 8192), (8192, 28672), (14336, 4096), (4096, 14336), (4096, 4096)]
    assert [kernels.gemm_config(16, n, k)["split_k"] for n, k in shapes] == [2, 8, 4, 8, 8]
    assert [kernels.gemm_config(64, n, k)["split_k"] for n, k in shapes] == [1, 4, 2, 8, 8]
    assert [kernels.gemm_config(64, n, k, bits=8)["split_k"] for n, k in shapes[:2]] == [2, 4]
    assert kernels.gemm_config(2048, 8192, 28672)["split_k"] == 1
    # scale_after where it won: layers of <= 8192 rows at M <= 16, launches of <= 2 splits at M = 17-64
    assert [bool(kernels.gemm_config(16, n, k).get("scale_after")) for n, k in shapes] == [0, 1, 0, 1, 1]
    assert [bool(kernels.gemm_config(64, n, k).get("scale_after")) for n, k in shapes] == [1, 0, 1, 0, 0]
    assert "scale_after" not in kernels.gemm_config(16, 4096, 4096, bits=8)
    # kperm (4 bits): x permuted per tile at M <= 16, once per call where M = 17-64 launches keep <= 2
    # splits and above M = 64 (128 x 128 tiles, split 2 where that leaves <= 128 tiles)
    assert [kernels.gemm_config(16, n, k).get("kperm") for n, k in shapes] == [1, 1, 1, 1, 1]
    assert [kernels.gemm_config(64, n, k).get("kperm") for n, k in shapes] == [2, None, 2, None, None]
    assert [(kernels.gemm_config(256, n, k)["kperm"], kernels.gemm_config(256, n, k)["split_k"])
            for n, k in shapes[:4]] == [(2, 1), (2, 2), (2, 1), (2, 2)]
    assert "kperm" not in kernels.gemm_config(16, 4096, 4096, bits=8)
    assert kernels.gemm_config(2048, 8192, 28672, bits=8)["block_m"] == 128   # 256 rows overflow shared memory
    # the copy engine at 4 bits everywhere (at M <= 16 since kperm; before, only on layers of >= 2^27 weights)
    assert [kernels.gemm_config(m, 28672, 8192)["tma"] for m in (4, 64, 256)] == [True, True, True]
    assert [kernels.gemm_config(m, 4096, 4096)["tma"] for m in (4, 64)] == [True, True]
    assert not kernels.gemm_config(64, 28672, 8192, bits=8)["tma"]


@gpu
@pytest.mark.parametrize("split,block_m,block_n", [(1, 16, 64), (3, 16, 64), (4, 64, 128), (2, 128, 128)])
@pytest.mark.parametrize("tma", [False, True])
def test_gemm_split_k_is_deterministic_and_reusable(split, block_m, block_n, tma):
    """Split-K GEMM tiles (a split count that does not divide the K steps, ragged M blocks) match the
    reference, and a repeated call gives the same bits with every tile counter back at zero."""
    from bitsmith.kernels import triton_gemm
    mod, qw = make_layer(4096, Scheme(bits=4, group_size=128), False, seed=5, n=200)
    mod = mod.cuda()
    qw = dataclasses.replace(qw, codes=qw.codes.cuda(), scale=qw.scale.cuda(), zero=qw.zero.cuda())
    pack = kernels.operands(mod, "triton_gemm")
    x = torch.randn(40, 4096, device="cuda").to(torch.bfloat16)
    ref = reference.weight_only_linear(x.float(), qw, mod.bias)
    cfg = {"split_k": split, "block_m": block_m, "block_n": block_n, "num_warps": 8 if block_m >= 128 else 4,
           "tma": tma}
    y1 = triton_gemm.gemm(x, pack, mod.bias.to(torch.bfloat16), **cfg)
    y2 = triton_gemm.gemm(x, pack, mod.bias.to(torch.bfloat16), **cfg)
    assert_matches(y1, ref)
    assert torch.equal(y1, y2)
    assert all(int(cnt.abs().sum()) == 0 for _, cnt in pack.scratch.values())


@gpu
@pytest.mark.parametrize("scheme", GPU_SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stored_order_dequantize_and_tma_gemm_match_reference(scheme, act_order, dtype):
    """The stored-column-order dense weight (large M's dequantize + cuBLAS), the copy-engine GEMM and the
    scale-after GEMM, forced on the ragged layer (N = 80, K = 576: a partial last K step and row block) and
    a 1536-deep one."""
    from bitsmith.kernels import triton_gemm, triton_wq
    for k in (576, 1536):
        mod, qw = make_layer(k, scheme, act_order, seed=k + 1)
        mod = mod.cuda()
        qw = dataclasses.replace(qw, codes=qw.codes.cuda(), scale=qw.scale.cuda(),
                                 zero=None if qw.zero is None else qw.zero.cuda(),
                                 perm=None if qw.perm is None else qw.perm.cuda())
        pack = kernels.operands(mod, "triton_gemm")
        bias = mod.bias.to(dtype)
        for m in MS:
            x = torch.randn(m, k, device="cuda").to(dtype)
            ref = reference.weight_only_linear(x.float(), qw, mod.bias)
            assert_matches(triton_gemm.dequant_matmul(x, pack, bias), ref)
            assert triton_wq.tma_reason(x, pack) is None
            for block_m, split, stages in [(16, 2, 4), (64, 1, 3)]:
                cfg = {"block_m": block_m, "split_k": split, "num_stages": stages, "tma": True}
                assert_matches(triton_gemm.gemm(x, pack, bias, **cfg), ref)
            # scales applied per K step on the accumulator: only where a step lies within one group
            step_words, group_words = (16 if scheme.bits == 4 else 32), pack.group * scheme.bits // 32
            for tma in (False, True):
                cfg = {"block_m": 16 if m <= 16 else 64, "split_k": 3, "tma": tma, "scale_after": True}
                if step_words <= group_words:
                    assert_matches(triton_gemm.gemm(x, pack, bias, **cfg), ref)
                else:
                    with pytest.raises(ValueError, match="scale_after needs K steps within one group"):
                        triton_gemm.gemm(x, pack, bias, **cfg)


@gpu
@pytest.mark.parametrize("scheme", GPU_SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kperm_gemm_matches_reference(scheme, act_order, dtype):
    """The GEMM with its K steps in the MMA fragments' order (kperm: x permuted per tile in the kernel, or
    once per call) matches the reference on ragged and deep layers, split, through the copy engine and with
    scale_after; it refuses what it cannot run (8 bits; kperm=2 where K is not a multiple of 128)."""
    from bitsmith.kernels import triton_gemm
    for k in KS:
        mod, qw = make_layer(k, scheme, act_order, seed=k + 7)
        mod = mod.cuda()
        qw = dataclasses.replace(qw, codes=qw.codes.cuda(), scale=qw.scale.cuda(),
                                 zero=None if qw.zero is None else qw.zero.cuda(),
                                 perm=None if qw.perm is None else qw.perm.cuda())
        pack = kernels.operands(mod, "triton_gemm")
        bias = mod.bias.to(dtype)
        for m in MS:
            x = torch.randn(m, k, device="cuda").to(dtype)
            ref = reference.weight_only_linear(x.float(), qw, mod.bias)
            for kperm in (1, 2):
                for tma, split, scale_after in [(False, 1, False), (True, 3, False), (True, 2, True)]:
                    cfg = {"block_m": 16 if m <= 16 else 64, "split_k": split, "tma": tma, "kperm": kperm,
                           "scale_after": scale_after and pack.group >= 128}
                    if scheme.bits != 4:
                        with pytest.raises(ValueError, match="kperm needs the 4-bit"):
                            triton_gemm.gemm(x, pack, bias, **cfg)
                    elif kperm == 2 and k % 128:
                        with pytest.raises(ValueError, match="not a multiple"):
                            triton_gemm.gemm(x, pack, bias, **cfg)
                    else:
                        assert_matches(triton_gemm.gemm(x, pack, bias, **cfg), ref)


@gpu
@pytest.mark.parametrize("k", [576, 4096])
def test_gemm_dispatch_drops_kperm_where_the_pack_cannot_run_it(k):
    """Dispatch asks for kperm at 4 bits; fractional zero points (HQQ-style) have no packed dequantization
    and K = 576 cannot take the per-call x permutation, so those launches run without it and still match."""
    mod, qw = make_layer(k, Scheme(bits=4, group_size=128), False, seed=k + 11)
    qw = dataclasses.replace(qw, zero=qw.zero + 0.25)
    mod = QuantLinear.from_qweight(qw, mod.bias).cuda()
    assert kernels.gemm_config(3, mod.n, k)["kperm"] == 1 and kernels.gemm_config(200, mod.n, k)["kperm"] == 2
    for m in (3, 64, 200):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        assert_matches(kernels.run(mod, x, "triton_gemm"), reference.weight_only_linear(x.float(), qw, mod.bias))


@gpu
@pytest.mark.parametrize("name", ["int8_fused", "int8_tma", "int8_intmm", "fp8"])
@pytest.mark.parametrize("k", KS)
def test_w8a8_kernels_match_reference(name, k):
    from bitsmith.kernels import triton_w8a8 as w8a8

    if name == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    n = 208                                            # torch._scaled_mm needs N % 16 == 0
    w = torch.randn(n, k, device="cuda")
    bias = torch.randn(n, device="cuda").half()
    if name == "fp8":
        ws = w.abs().amax(1) / reference.FP8_E4M3_MAX
        w8 = (w / ws[:, None]).to(torch.float8_e4m3fn)
        fn, ref_fn = w8a8.fp8_scaled_mm, reference.fp8_linear
    else:
        ws = w.abs().amax(1) / 127
        w8 = torch.round(w / ws[:, None]).clamp(-127, 127).to(torch.int8)
        fn = {"int8_fused": partial(w8a8.int8_fused, tma=False),
              "int8_tma": partial(w8a8.int8_fused, tma=True), "int8_intmm": w8a8.int8_intmm}[name]
        ref_fn = reference.w8a8_linear
    for m in MS:
        if name == "int8_intmm" and m <= 16:
            continue                                   # torch._int_mm needs M > 16 (the dispatcher checks)
        x = torch.randn(m, k, device="cuda").half()
        assert_matches(fn(x, w8, ws, bias), ref_fn(x, w8, ws, bias))
