"""Binary and ternary weights (issue 5): bit-exact 1- and 2-bit packing, the XNOR-Net and TWN rules, exact
storage, and a real CNN trained on scikit-learn's digits quantized end to end (benchmarks/digits_cnn.py)."""

import importlib.util
import os

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import Recipe, Scheme
from bitsmith.nn import QuantConv2d, QuantLinear
from bitsmith.packing import pack, unpack
from bitsmith.primitives import dequantize_weight, quantize_weight

BINARY = Scheme(grid="binary", group_size=None)
TERNARY = Scheme(grid="ternary", group_size=None)


@pytest.mark.parametrize("bits,k", [(1, 33), (1, 577), (2, 100), (2, 7)])
def test_pack_unpack_bit_exact(bits, k):
    codes = torch.randint(0, 1 << bits, (9, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (9, (k * bits + 7) // 8)
    assert torch.equal(unpack(packed, bits, k), codes)


def test_bit_layout_is_lsb_first():
    assert pack(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.uint8), 1).tolist() == [[0b1101, 1]]
    assert pack(torch.tensor([[2, 0, 1, 2, 1]], dtype=torch.uint8), 2).tolist() == [[0b10010010, 1]]


def test_binary_is_sign_times_mean_abs_per_channel():
    w = torch.randn(16, 50)
    qw = quantize_weight(w, BINARY)
    assert qw.scheme.bits == 1 and qw.scale.shape == (16, 1)
    assert torch.equal(qw.codes, (w >= 0).to(torch.uint8))
    assert torch.allclose(qw.scale.float().squeeze(1), w.abs().mean(1), rtol=1e-3)   # fp16 scale
    dq = dequantize_weight(qw)
    assert torch.equal(dq.sign(), torch.where(w >= 0, 1.0, -1.0))
    # mean|w| is the least-squares scale of sign(w): any other scale errs more
    for f in (0.9, 1.1):
        assert (w - dq).pow(2).sum() < (w - f * dq).pow(2).sum()


def test_ternary_follows_the_twn_threshold():
    w = torch.randn(16, 64)
    qw = quantize_weight(w, TERNARY)
    assert qw.scheme.bits == 2 and set(qw.codes.unique().tolist()) <= {0, 1, 2}
    delta = 0.7 * w.abs().mean(1, keepdim=True)
    keep = w.abs() > delta
    assert torch.equal(qw.codes, (1 + w.sign() * keep).to(torch.uint8))
    expect = (w.abs() * keep).sum(1) / keep.sum(1)
    assert torch.allclose(qw.scale.float().squeeze(1), expect, rtol=1e-3)
    assert (dequantize_weight(qw)[~keep] == 0).all()


@pytest.mark.parametrize("scheme", [BINARY, TERNARY], ids=["binary", "ternary"])
def test_modules_store_one_and_two_bits_and_reload_exactly(scheme, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    bitsmith.quantize(model, Recipe(method="rtn", scheme=scheme, ignore=()))
    assert isinstance(model[0], QuantConv2d) and isinstance(model[2], QuantLinear)
    assert model[2].qcodes.shape == (5, (128 * scheme.bits) // 8)        # 1 or 2 bits per weight
    out = bitsmith.save(model, tmp_path / scheme.grid)
    loaded = bitsmith.load(out, nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), loaded(x))


@pytest.mark.slow
def test_digits_cnn_end_to_end():
    """A CNN trained on sklearn digits in seconds, then binarised / ternarised post-training: the accuracy
    cost is real and measured (the README's table), and every quantized model reloads exactly."""
    pytest.importorskip("sklearn")
    # loaded by path: putting benchmarks/ on sys.path would let its scripts shadow packages (kernels.py)
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "digits_cnn.py")
    spec = importlib.util.spec_from_file_location("digits_cnn", path)
    digits_cnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits_cnn)

    rows = {r["config"]: r for r in digits_cnn.run(seed=0)}
    print({k: round(r["accuracy"], 3) for k, r in rows.items()})
    assert rows["fp32"]["accuracy"] > 0.95
    assert all(r["reloads"] for r in rows.values())
    assert rows["ternary, all layers"]["accuracy"] > 0.9
    assert rows["binary, first/last fp"]["accuracy"] > 0.85
    assert 0.3 < rows["binary, all layers"]["accuracy"] < rows["fp32"]["accuracy"]     # a real cost, not noise
    assert 1.0 < rows["binary, all layers"]["bpw"] < 1.1 and 2.0 < rows["ternary, all layers"]["bpw"] < 2.1
