"""Numerics: zero points, grids, SQNR floors, ragged groups, degenerate and bad weights."""

import math

import pytest
import torch

from bitsmith import BitsmithError, Scheme, dequantize_weight, quantize_weight
from bitsmith.methods import rtn
from bitsmith.numerics import FP4_CODEBOOK, NF4_CODEBOOK, IntGrid
from bitsmith.primitives import dequantize, fake_quantize, quantize_affine

from .helpers import sqnr_db


def test_seed_zero_point_case_int8_asymmetric_signed():
    # The seed lesson clamps z = round(-rmin/s) to 127 and reconstructs every positive value as 0.
    x = torch.linspace(-1, 1, 10)
    q, s, z = quantize_affine(x, 8, symmetric=False, signed=True)
    assert q.min() >= -128 and q.max() <= 127
    err = (dequantize(q, s, z) - x).abs()
    assert (err <= s / 2 + 1e-7).all(), err
    assert (dequantize(q, s, z)[5:] > 0).all()          # the positives survive


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_affine_per_channel_any_axis(signed, symmetric):
    torch.manual_seed(0)
    x = torch.randn(6, 7, 5)
    for axis in (0, 1, 2, -1):
        q, s, z = quantize_affine(x, 8, symmetric=symmetric, signed=signed, axis=axis)
        grid = IntGrid(8, signed)
        assert q.min() >= grid.qmin and q.max() <= grid.qmax
        assert s.shape[axis] == x.shape[axis] and s.numel() == x.shape[axis]
        assert ((dequantize(q, s, z) - x).abs() <= s / 2 + 1e-6).all()


def test_per_tensor_unsigned_and_scale_floor():
    x = torch.tensor([0.0, 0.5, 3.0])
    q, s, z = quantize_affine(x, 4)
    assert s.numel() == 1 and float(z) == 0.0 and int(q.max()) == 15


@pytest.mark.parametrize("bits,floor", [(8, 43.0), (4, 18.0), (3, 12.0), (2, 4.5)])
def test_sqnr_floor_gaussian_asym_g128(bits, floor):
    torch.manual_seed(0)
    w = torch.randn(512, 2048)
    qw = quantize_weight(w, Scheme(bits=bits, group_size=128))
    assert sqnr_db(w, dequantize_weight(qw)) >= floor


def test_per_channel_and_symmetric_grids():
    torch.manual_seed(1)
    w = torch.randn(64, 300)
    pc = quantize_weight(w, Scheme(bits=8, group_size=None))
    assert pc.scale.shape == (64, 1) and sqnr_db(w, dequantize_weight(pc)) > 35
    sym = quantize_weight(w, Scheme(bits=4, group_size=32, symmetric=True))
    assert sym.zero is None and int(sym.codes.min()) >= 1      # restricted range: codes 1..15 around 8
    assert sqnr_db(w, dequantize_weight(sym)) > 15


@pytest.mark.parametrize("k", [33, 100, 576])
def test_ragged_last_group(k):
    torch.manual_seed(2)
    w = torch.randn(8, k)
    qw = quantize_weight(w, Scheme(bits=4, group_size=128 if k == 576 else 32))
    g = 128 if k == 576 else 32
    assert qw.scale.shape == (8, math.ceil(k / g))
    # The ragged last group is quantized on its own range: equal to quantizing it alone.
    last = w[:, (k // g) * g:]
    if last.numel():
        alone = quantize_weight(last, Scheme(bits=4, group_size=g))
        assert torch.equal(qw.codes[:, (k // g) * g:], alone.codes)
        assert torch.equal(qw.scale[:, -1:], alone.scale)


@pytest.mark.parametrize("sym", [False, True])
def test_zero_and_constant_groups(sym):
    w = torch.zeros(4, 64)
    w[1, :32] = 0.37
    w[2, 32:] = -1.25
    w[3] = torch.linspace(-1, 1, 64)
    qw = quantize_weight(w, Scheme(bits=4, group_size=32, symmetric=sym, scale_dtype="float32"))
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    dq = dequantize_weight(qw)
    assert torch.equal(dq[0], w[0])                               # all-zero group: exact
    torch.testing.assert_close(dq[1:3], w[1:3], rtol=1e-6, atol=0)  # constant groups: exact to fp32 rounding
    # with float16 scales, constant groups are off only by the scale's own rounding
    dq16 = dequantize_weight(quantize_weight(w, Scheme(bits=4, group_size=32, symmetric=sym)))
    assert torch.equal(dq16[0], w[0])
    torch.testing.assert_close(dq16[1:3], w[1:3], rtol=2 ** -10, atol=0)


def test_nan_and_inf_name_the_tensor():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(BitsmithError, match="layers.3.q_proj.weight"):
        quantize_weight(w, Scheme(bits=4, group_size=8), name="layers.3.q_proj.weight")
    w[1, 2] = float("inf")
    with pytest.raises(BitsmithError, match="NaN/Inf"):
        quantize_weight(w, Scheme(bits=4, group_size=8))


def test_bad_schemes():
    for bad in (0, 9, -1):
        with pytest.raises(BitsmithError, match="bits"):
            Scheme(bits=bad)
    with pytest.raises(BitsmithError, match="group size"):
        Scheme(group_size=0)
    with pytest.raises(BitsmithError, match="binary"):
        Scheme(bits=1, symmetric=True)
    with pytest.raises(BitsmithError, match="grid"):
        Scheme(grid="int5")


def test_codebooks_are_sorted_with_exact_zero():
    for book in (NF4_CODEBOOK, FP4_CODEBOOK):
        assert len(book) == 16 and list(book) == sorted(book) and 0.0 in book
        assert book[0] == -1.0 and book[-1] == 1.0


@pytest.mark.parametrize("grid,floor", [("nf4", 19.0), ("fp4", 17.0), ("fp8_e4m3", 30.0), ("fp8_e5m2", 24.0),
                                        ("binary", 4.0), ("ternary", 6.5)])
def test_lookup_grids(grid, floor):
    torch.manual_seed(3)
    w = torch.randn(128, 256)
    qw = quantize_weight(w, Scheme(group_size=64, grid=grid))
    assert qw.zero is None and int(qw.codes.max()) < (1 << qw.scheme.bits)
    assert sqnr_db(w, dequantize_weight(qw)) >= floor


def test_fp8_codes_are_the_float8_bit_patterns():
    w = torch.tensor([[0.5, -1.0, 448.0, 0.0]])
    qw = quantize_weight(w, Scheme(group_size=None, grid="fp8_e4m3", scale_dtype="float32"))
    assert float(qw.scale) == 1.0
    assert torch.equal(qw.codes, w.to(torch.float8_e4m3fn).view(torch.uint8))


def test_binary_and_ternary_levels():
    w = torch.tensor([[0.9, -1.1, 0.05, -0.02, 1.0, -1.0]])
    b = dequantize_weight(quantize_weight(w, Scheme(group_size=None, grid="binary", scale_dtype="float32")))
    assert torch.allclose(b.abs(), w.abs().mean().expand_as(b)) and torch.equal(b.sign(), w.sign())
    t = dequantize_weight(quantize_weight(w, Scheme(group_size=None, grid="ternary", scale_dtype="float32")))
    assert t[0, 2] == 0 and t[0, 3] == 0 and (t[0, [0, 1, 4, 5]].sign() == w[0, [0, 1, 4, 5]].sign()).all()


def test_fp16_bf16_casts_are_lossless_for_representable_values():
    x = torch.tensor([1.0, 0.5, -2.25])
    assert torch.equal(x.to(torch.float16).float(), x) and torch.equal(x.to(torch.bfloat16).float(), x)


def test_fake_quantize_straight_through():
    x = torch.randn(16, requires_grad=True)
    q, s, z = quantize_affine(x.detach(), 4)
    y = fake_quantize(x, s, z, IntGrid(4))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(16))
    assert torch.allclose(y, dequantize(q, s, z))


def test_rtn_mse_clipping_beats_minmax_on_heavy_tails():
    torch.manual_seed(4)
    w = torch.distributions.StudentT(2.0).sample((256, 512))
    for bits, gain in ((2, 0.5), (3, 0.2)):
        s = Scheme(bits=bits, group_size=64)
        plain = sqnr_db(w, dequantize_weight(rtn.quantize(w, None, s)))
        clipped = sqnr_db(w, dequantize_weight(rtn.quantize(w, None, s, mse=True)))
        assert clipped > plain + gain
