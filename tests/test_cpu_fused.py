"""The Inductor-compiled CPU kernel (kernels/cpu_fused.py) against kernels/reference.py, on the grid issue 8
asks of every kernel (M in {1, 3, 17, 64}, K in {576, 1536, 4096}, with and without act-order), its byte
layout bit-exactly, and its fall-back when compiling fails. Needs a C++ compiler; skips without one."""

from __future__ import annotations

import pytest
import torch

from bitsmith import kernels
from bitsmith.kernels import cpu_fused, reference
from bitsmith.recipe import Scheme
from .test_kernels import KS, MS, assert_matches, make_input_scaled_layer, make_layer

needs_inductor = pytest.mark.skipif(cpu_fused.missing() is not None, reason=str(cpu_fused.missing()))
FULL = [Scheme(bits=4, group_size=64), Scheme(bits=8, group_size=None, symmetric=True)]
MORE = [Scheme(bits=4, group_size=32, symmetric=True), Scheme(bits=8, group_size=32),
        Scheme(bits=2, group_size=64), Scheme(bits=2, group_size=None, symmetric=True),
        Scheme(bits=3, group_size=64), Scheme(bits=3, group_size=32, symmetric=True),
        Scheme(bits=1, group_size=64), Scheme(bits=5, group_size=64), Scheme(bits=6, group_size=None)]


@pytest.mark.parametrize("bits,g", [(2, 64), (4, 64), (4, 576), (8, 32)])
def test_layout_is_bit_exact(bits, g):
    """Byte j of a group holds code p * h + j at bit p * bits: unpacking it gives back every code."""
    gen = torch.Generator().manual_seed(g)
    codes = torch.randint(0, 1 << bits, (24, 576), dtype=torch.uint8, generator=gen)
    w = cpu_fused.pack_codes(codes, bits, g)
    assert w.shape == (24, 576 * bits // 8) and w.dtype == torch.uint8
    per, h = 8 // bits, g * bits // 8
    sub = [(w.view(24, -1, h) >> (p * bits)) & ((1 << bits) - 1) for p in range(per)]
    assert torch.equal(torch.cat(sub, -1).view(24, 576), codes)


@needs_inductor
@pytest.mark.parametrize("scheme", FULL, ids=lambda s: s.label())
@pytest.mark.parametrize("k", KS)
def test_matches_reference_on_the_issue_grid(scheme, k):
    for act_order in (False, True):
        mod, qw = make_layer(k, scheme, act_order, seed=k + act_order)
        for m in MS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            assert_matches(kernels.run(mod, x, "cpu_fused"), reference.weight_only_linear(x, qw, mod.bias))
    xb = torch.randn(3, k).to(torch.bfloat16)                                      # bf16 activations
    y = kernels.run(mod, xb, "cpu_fused")
    assert y.dtype == torch.bfloat16
    assert_matches(y, reference.weight_only_linear(xb, qw, mod.bias))


@needs_inductor
@pytest.mark.parametrize("scheme", MORE, ids=lambda s: s.label())
def test_other_widths_and_groups(scheme):
    mod, qw = make_layer(576, scheme, act_order=True, seed=3)
    for m in (1, 3):
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m))
        assert kernels.select(mod, x) == "cpu_fused"
        assert_matches(mod(x), reference.weight_only_linear(x, qw, mod.bias))


def test_refuses_what_it_cannot_run():
    assert [cpu_fused.store_bits(b) for b in range(1, 9)] == [2, 2, 4, 4, 8, 8, 8, 8]
    assert "grid nf4" in cpu_fused.unsupported_reason(8, 576, Scheme(bits=4, grid="nf4"), {})
    assert "dividing K" in cpu_fused.unsupported_reason(8, 600, Scheme(bits=4, group_size=128), {})
    assert "transforms" in cpu_fused.unsupported_reason(8, 576, Scheme(bits=4), {"had_in": None})
    assert cpu_fused.unsupported_reason(8, 576, Scheme(bits=4, group_size=64), {}) is None


@needs_inductor
def test_a_failed_compile_falls_back_to_the_same_numbers(monkeypatch):
    """A broken tool chain must cost speed, never the forward: the eager math runs, one warning says why,
    and dispatch stops picking the kernel."""
    import torch._inductor

    def broken(*a, **kw):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(cpu_fused, "_compiled", {})
    monkeypatch.setattr(cpu_fused, "_broken", [])
    monkeypatch.setattr(torch._inductor, "compile", broken)
    mod, qw = make_layer(576, Scheme(bits=4, group_size=64), act_order=False)
    x = torch.randn(1, 576)
    with pytest.warns(UserWarning, match="cpu_fused disabled.*no compiler today"):
        y = kernels.run(mod, x, "cpu_fused")
    assert_matches(y, reference.weight_only_linear(x, qw, mod.bias))
    assert "no compiler today" in kernels.available()["cpu_fused"]
    assert kernels.select(mod, x) != "cpu_fused"


@needs_inductor
def test_a_users_torch_compile_traces_the_reference_path():
    """Dispatch steps aside inside torch.compile (no compile within the compile, no cached-operand
    mutation in the trace): the user's compiler gets the plain dequantize + linear, whole graph."""
    mod, qw = make_layer(576, Scheme(bits=4, group_size=64), act_order=True)
    x = torch.randn(1, 576)
    with torch.no_grad():
        y = torch.compile(mod, fullgraph=True)(x)
    assert_matches(y, reference.weight_only_linear(x, qw, mod.bias))


@needs_inductor
def test_awq_input_scaled_layers_run_the_kernel_on_x_over_s():
    """AWQ's run-time input scale (o_proj under GQA): the module scales x itself, then the codes are an
    ordinary weight for the kernel; act-order on top."""
    mod, qw, g = make_input_scaled_layer(576, Scheme(bits=4, group_size=64), seed=7)
    x = torch.randn(1, 576, generator=g)
    assert kernels.select(mod, x) == "cpu_fused"
    assert_matches(mod(x), reference.weight_only_linear(x, qw, mod.bias))
    kernels.set_policy("reference")
    try:
        assert_matches(mod(x), reference.weight_only_linear(x, qw, mod.bias))
    finally:
        kernels.set_policy(None)


def test_without_a_compiler_the_forced_kernel_runs_the_eager_math(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_compiled", {})
    monkeypatch.setattr(cpu_fused, "missing", lambda: "no C++ compiler (test)")
    mod, qw = make_layer(576, Scheme(bits=4, group_size=64), act_order=True)
    x = torch.randn(2, 576)
    assert kernels.select(mod, x) != "cpu_fused" and "no C++ compiler" in kernels.available()["cpu_fused"]
    assert_matches(kernels.run(mod, x, "cpu_fused"), reference.weight_only_linear(x, qw, mod.bias))
    assert not cpu_fused._compiled
