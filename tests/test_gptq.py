"""GPTQ: RTN on an identity Hessian, non-PD Hessians, act-order, static groups, and beating RTN on real data."""

import logging

import pytest
import torch

from bitsmith import BitsmithError, Scheme, dequantize_weight, quantize_weight
from bitsmith.methods import gptq, rtn

from .test_calibrate import real_layer


def out_err(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    """||X W^T - X Q^T|| / ||X W^T||."""
    ref = x @ w.T
    return float((ref - x @ q.T).norm() / ref.norm())


def correlated(k: int, t: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and uneven scales, like a transformer's. (T, K)"""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(t, k, generator=g) @ mix) * (torch.rand(k, generator=g) * 3 + 0.1)


SCHEMES = [Scheme(bits=4, group_size=64), Scheme(bits=3, group_size=None), Scheme(bits=4, group_size=32, symmetric=True),
           Scheme(bits=2, group_size=100), Scheme(bits=8, group_size=128, scale_dtype="float32")]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("k", [576, 100, 33])
@pytest.mark.parametrize("mse", [False, True])
def test_identity_hessian_reproduces_rtn_exactly(scheme, k, mse):
    """With `mse`, the group parameters come from RTN's MSE clipping search: then MSE-clipped RTN exactly."""
    torch.manual_seed(0)
    w = torch.randn(24, k)
    info = {}
    qw = gptq.quantize(w, {"hessian": torch.eye(k)}, scheme, info=info, act_order=False, mse=mse)
    ref = rtn.quantize(w, None, scheme, mse=mse)
    assert torch.equal(qw.codes, ref.codes)
    assert torch.equal(qw.scale, ref.scale)
    assert (qw.zero is None and ref.zero is None) or torch.equal(qw.zero, ref.zero)
    assert qw.perm is None and info == {"damp": 0.01}


@pytest.mark.parametrize("act_order", [False, True])
def test_zero_inputs_are_dead_columns_and_quantize_without_error(act_order):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = correlated(64)
    x[:, 5] = 0                                          # one dead input
    qw = gptq.quantize(w, {"hessian": x.T @ x / len(x)}, Scheme(bits=4, group_size=32), act_order=act_order)
    assert torch.isfinite(dequantize_weight(qw)).all()
    qw0 = gptq.quantize(w, {"hessian": torch.zeros(64, 64)}, Scheme(bits=4, group_size=32))   # all inputs 0
    assert torch.equal(dequantize_weight(qw0), dequantize_weight(quantize_weight(w, Scheme(bits=4, group_size=32))))


def test_non_pd_hessian_escalates_damping_and_logs(caplog):
    torch.manual_seed(0)
    w = torch.randn(16, 48)
    x = torch.randn(256, 1).repeat(1, 48)               # every input duplicated: H has rank 1
    info = {}
    with caplog.at_level(logging.WARNING, logger="bitsmith.methods.gptq"):
        qw = gptq.quantize(w, {"hessian": x.T @ x / len(x)}, Scheme(bits=4, group_size=16), damp=0.0,
                           name="dup.weight", info=info)
    assert torch.isfinite(dequantize_weight(qw)).all()
    assert info["damp"] > 0 and info.get("damp_escalated")
    assert "dup.weight" in caplog.text and "escalated" in caplog.text


def test_hopeless_hessian_falls_back_to_rtn_and_logs(caplog):
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    info = {}
    with caplog.at_level(logging.WARNING, logger="bitsmith.methods.gptq"):
        qw = gptq.quantize(w, {"hessian": -torch.eye(32)}, Scheme(bits=4, group_size=16), name="neg.weight",
                           info=info)
    assert torch.equal(qw.codes, quantize_weight(w, Scheme(bits=4, group_size=16)).codes)
    assert info["fallback"].startswith("rtn") and "neg.weight" in caplog.text
    info = {}
    gptq.quantize(w, None, Scheme(bits=4, group_size=16), info=info)            # no statistics at all
    assert "fallback" in info


@pytest.mark.parametrize("scheme", [Scheme(bits=4, group_size=64), Scheme(bits=3, group_size=None),
                                    Scheme(bits=3, group_size=48, symmetric=True)], ids=lambda s: s.label())
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True), (False, True)])
def test_gptq_beats_rtn_on_correlated_inputs(scheme, act_order, static):
    torch.manual_seed(0)
    k = 200                                              # ragged last group for g64 and g48
    w = torch.randn(32, k)
    x = correlated(k)
    qw = gptq.quantize(w, {"hessian": x.T @ x / len(x)}, scheme, act_order=act_order, static_groups=static,
                       block_size=64)
    rtn = out_err(w, dequantize_weight(quantize_weight(w, scheme)), x)
    assert out_err(w, dequantize_weight(qw), x) < 0.85 * rtn
    per_group = scheme.group_size is not None and not static
    assert (qw.perm is not None) == (act_order and per_group)          # static / per-channel: codes unpermuted
    if qw.perm is not None:
        assert sorted(qw.perm.tolist()) == list(range(k))


def test_block_size_does_not_change_the_result():
    torch.manual_seed(0)
    w, x = torch.randn(16, 150), correlated(150)
    h = {"hessian": x.T @ x / len(x)}
    a = gptq.quantize(w, h, Scheme(bits=3, group_size=32), block_size=128)
    b = gptq.quantize(w, h, Scheme(bits=3, group_size=32), block_size=7)
    assert (a.codes != b.codes).float().mean() < 0.01                   # float rounding only


def test_bad_input_is_a_bitsmith_error():
    w = torch.randn(4, 8)
    with pytest.raises(BitsmithError, match="integer grids"):
        gptq.quantize(w, {"hessian": torch.eye(8)}, Scheme(bits=4, group_size=8, grid="nf4"))
    with pytest.raises(BitsmithError, match="hessian shape"):
        gptq.quantize(w, {"hessian": torch.eye(9)}, Scheme(bits=4, group_size=8))
    with pytest.raises(BitsmithError, match="damp"):
        gptq.quantize(w, {"hessian": torch.eye(8)}, Scheme(bits=4, group_size=8), damp=-1)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["self_attn.q_proj", "mlp.down_proj"])
@pytest.mark.parametrize("scheme", [Scheme(bits=4, group_size=64), Scheme(bits=3, group_size=64),
                                    Scheme(bits=4, group_size=None), Scheme(bits=3, group_size=None)],
                         ids=lambda s: s.label())
def test_gptq_beats_rtn_on_a_real_smollm2_layer(smollm2, layer, scheme):
    w, x_cal, x_test = real_layer(smollm2, layer)
    h = {"hessian": x_cal.T @ x_cal / len(x_cal)}
    rtn = dequantize_weight(quantize_weight(w, scheme))
    for act_order in (False, True):
        q = dequantize_weight(gptq.quantize(w, h, scheme, act_order=act_order))
        assert out_err(w, q, x_cal) < out_err(w, rtn, x_cal)
        assert out_err(w, q, x_test) < out_err(w, rtn, x_test)          # held-out tokens too
