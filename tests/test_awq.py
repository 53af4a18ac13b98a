"""AWQ: scale search never loses to RTN, clipping search, output-preserving folds (and refused folds), runtime
input scales, and beating RTN on real SmolLM2 layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsmith import Scheme, dequantize_weight, quantize_weight
from bitsmith.calibrate import Group
from bitsmith.methods import awq
from bitsmith.nn import InputScaledLinear, QuantLinear

from .test_calibrate import real_inputs
from .test_gptq import correlated, out_err


def stats_of(x: torch.Tensor) -> dict:
    return {"hessian": x.T @ x / len(x), "act_absmean": x.abs().mean(0)}


def test_diag_blocks_handle_a_ragged_last_group():
    h = torch.arange(100.0).view(10, 10)
    b = awq.diag_blocks(h, 4)                                          # groups 0-3, 4-7, 8-9 (+2 padding)
    assert b.shape == (3, 4, 4)
    assert torch.equal(b[1], h[4:8, 4:8])
    assert torch.equal(b[2][:2, :2], h[8:, 8:]) and b[2][2:].abs().sum() == 0


@pytest.mark.parametrize("scheme", [Scheme(bits=4, group_size=64), Scheme(bits=3, group_size=None)],
                         ids=lambda s: s.label())
def test_scale_search_and_clipping_never_lose_to_rtn(scheme):
    torch.manual_seed(0)
    x = correlated(160) * (torch.rand(160) * 20).exp().sqrt()          # a few very salient channels
    w = torch.randn(48, 160)
    st = stats_of(x)
    s, label, ratio = awq.search_scale(w, st["hessian"], st["act_absmean"], scheme)
    assert s is not None and ratio < 0.9 and label != "none"
    rtn = out_err(w, dequantize_weight(quantize_weight(w, scheme)), x)
    scaled = dequantize_weight(quantize_weight(w * s, scheme)) / s
    assert out_err(w, scaled, x) < rtn
    st_s = {"hessian": st["hessian"] / torch.outer(s, s), "act_absmean": st["act_absmean"] / s}
    clipped = dequantize_weight(awq.quantize(w * s, st_s, scheme)) / s
    assert out_err(w, clipped, x) <= out_err(w, scaled, x) + 1e-6


def test_identity_scale_wins_when_inputs_are_white():
    torch.manual_seed(0)
    x, w = torch.randn(4096, 64), torch.randn(16, 64)
    s, label, ratio = awq.search_scale(w, *stats_of(x).values(), Scheme(bits=4, group_size=32), duo_scaling=False)
    assert ratio <= 1.0 and (s is None) == (label == "none")


class MLPBlock(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.fc1, self.fc2, self.act = nn.Linear(32, 64), nn.Linear(64, 32), act

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@pytest.mark.parametrize("act,folds", [(F.relu, True), (F.gelu, False)])
def test_folds_are_checked_on_the_block_output(act, folds):
    torch.manual_seed(0)
    block = MLPBlock(act)
    x = torch.randn(4, 16, 32) * torch.linspace(0.1, 5, 32)
    want = block(x).detach()
    h1 = block.norm(x).reshape(-1, 32)
    h2 = act(block.fc1(block.norm(x))).reshape(-1, 64).detach()
    mods = {"fc1": block.fc1, "fc2": block.fc2}
    stats = {"fc1": stats_of(h1.detach()), "fc2": stats_of(h2)}
    info = {}
    groups = [Group(["fc1"], "norm"), Group(["fc2"])]
    with torch.no_grad():
        out = awq.transform_block(block, groups, mods, stats, Scheme(bits=3, group_size=16),
                                  probe=lambda: block(x), info=info)
        assert torch.allclose(block(x), want, atol=1e-4)               # float output preserved either way
    assert info["fc1"]["awq_fold"] == "fold:norm"
    assert info["fc2"]["awq_fold"] == ("fold:fc1" if folds else "none")  # ReLU is homogeneous, GELU is not
    assert ("input_scale" in (out["fc2"] or {})) is False


def test_runtime_input_scale_when_no_fold_holds():
    torch.manual_seed(0)
    block = MLPBlock(F.gelu)
    x = torch.randn(4, 16, 32) * torch.linspace(0.1, 5, 32)
    w0 = block.fc2.weight.detach().clone()
    h2 = F.gelu(block.fc1(block.norm(x))).reshape(-1, 64).detach() * torch.linspace(0.1, 8, 64)
    info = {}
    with torch.no_grad():
        out = awq.transform_block(block, [Group(["fc2"])], {"fc2": block.fc2}, {"fc2": stats_of(h2)},
                                  Scheme(bits=3, group_size=16), probe=lambda: block(x), runtime_scale=True,
                                  info=info)
    assert info["fc2"]["awq_fold"] == "runtime"
    assert torch.equal(block.fc2.weight, w0)                          # the float layer is left as it is
    qw = awq.quantize(block.fc2.weight.detach(), out["fc2"], Scheme(bits=3, group_size=16))
    mod = QuantLinear.from_qweight(qw, block.fc2.bias, "awq")
    assert isinstance(mod, InputScaledLinear)                          # x * input_scale feeds W diag(s)
    with torch.no_grad():
        got = mod(h2) - block.fc2.bias
    assert torch.allclose(got, h2 @ dequantize_weight(qw).T, rtol=1e-4, atol=1e-4)   # the reference agrees
    rtn = h2 @ dequantize_weight(quantize_weight(w0, Scheme(bits=3, group_size=16))).T
    want = h2 @ w0.T
    assert (got - want).norm() < (rtn - want).norm()


@pytest.mark.slow
@pytest.mark.parametrize("group", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.down_proj"]],
                         ids=["qkv", "down"])
@pytest.mark.parametrize("scheme", [Scheme(bits=4, group_size=64), Scheme(bits=3, group_size=64),
                                    Scheme(bits=4, group_size=None), Scheme(bits=3, group_size=None)],
                         ids=lambda s: s.label())
def test_awq_beats_rtn_on_a_real_smollm2_layer(smollm2, group, scheme):
    x_cal, x_test = real_inputs(smollm2, group[0])
    ws = [smollm2.model.get_submodule(f"model.layers.3.{n}").weight.detach().float() for n in group]
    w = torch.cat(ws)                                                  # one shared scale for the group
    st = stats_of(x_cal)
    s, _, _ = awq.search_scale(w, st["hessian"], st["act_absmean"], scheme)
    s = torch.ones(w.shape[1]) if s is None else s
    st_s = {"hessian": st["hessian"] / torch.outer(s, s), "act_absmean": st["act_absmean"] / s}
    q = torch.cat([dequantize_weight(awq.quantize(wi * s, st_s, scheme)) / s for wi in ws])
    rtn = dequantize_weight(quantize_weight(w, scheme))
    assert out_err(w, q, x_cal) < out_err(w, rtn, x_cal)
    assert out_err(w, q, x_test) < out_err(w, rtn, x_test)
