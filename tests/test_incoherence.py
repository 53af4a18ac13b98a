"""Incoherence processing (issue 5): exact orthogonal transforms for 576 and 1536, the run-time module, the
Hessian transformed alike, and incoherence + RTN / GPTQ (`quip`) beating the untransformed method."""

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import Recipe, Scheme
from bitsmith.methods import gptq, incoherence, quip, rtn
from bitsmith.nn import HadamardLinear, QuantLinear
from bitsmith.numerics import hadamard_factors, hadamard_supported
from bitsmith.primitives import dequantize_weight, hadamard_transform, random_hadamard, undo_hadamard

from .helpers import sqnr_db


def signs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1


def student_t(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(n, k, 3, generator=g).pow(2).sum(-1)
    return 0.02 * torch.randn(n, k, generator=g) / (chi2 / 3).sqrt()


@pytest.mark.parametrize("n", [576, 1536, 192, 64, 100])
def test_transform_is_exactly_orthogonal_and_invertible(n):
    eye = torch.eye(n, dtype=torch.float64)
    q = hadamard_transform(eye)                                     # rows: Q e_i
    assert torch.allclose(q @ q.T, eye, atol=1e-12)                 # orthogonal in float64
    s = signs(n)
    x = torch.randn(16, n)
    back = random_hadamard(random_hadamard(x, s), s, inverse=True)
    assert (back - x).abs().max() < 1e-5 * x.abs().max()            # identity to fp32 precision
    assert torch.allclose(random_hadamard(x.double(), s), random_hadamard(x, s).double(), atol=1e-5)


def test_576_and_1536_are_full_hadamards_not_block_diagonal():
    for n, d in ((576, 36), (1536, 12)):
        dense, p, blocks = hadamard_factors(n)
        assert blocks == 1 and dense.shape == (d, d) and d * p == n and hadamard_supported(n)
        assert torch.equal(dense @ dense.T, d * torch.eye(d))       # a true +-1 Hadamard matrix
    # the transform spreads one coordinate over all n: every output entry has magnitude 1/sqrt(n)
    e0 = torch.zeros(1, 576)
    e0[0, 0] = 1.0
    assert torch.allclose(hadamard_transform(e0).abs(), torch.full((1, 576), 576 ** -0.5), atol=1e-6)


def test_weight_transform_round_trips_and_module_matches_reference():
    w = student_t(192, 576)
    qw = incoherence.quantize(w, None, Scheme(bits=8, group_size=64), name="layer.weight")
    assert set(qw.transform) == {"had_in", "had_out"} and qw.transform["had_in"].dtype == torch.uint8
    assert sqnr_db(w, dequantize_weight(qw)) > 40                    # 8 bits through the transforms
    s_in, s_out = incoherence.layer_signs(576, 192, 0, "layer.weight")
    wt = incoherence.transform_weight(w, s_in, s_out)
    assert (undo_hadamard(wt, {"had_in": qw.transform["had_in"], "had_out": qw.transform["had_out"]}) - w
            ).abs().max() < 1e-6
    bias = torch.randn(192)
    m = QuantLinear.from_qweight(qw, bias, "incoherence")
    assert isinstance(m, HadamardLinear)
    x = torch.randn(2, 5, 576)
    ref = x @ dequantize_weight(qw).T + bias
    assert torch.allclose(m(x), ref, atol=1e-4, rtol=1e-4)


def test_hessian_is_transformed_alike():
    x = torch.randn(300, 192)
    s = signs(192, 1)
    xv = random_hadamard(x, s)                                       # the inputs the transformed layer sees
    assert torch.allclose(incoherence.transform_hessian(x.T @ x, s), xv.T @ xv, atol=1e-3, rtol=1e-4)


def test_incoherence_beats_rtn_on_heavy_tailed_weights():
    w = student_t(256, 576, seed=1)
    for bits in (3, 2):
        scheme = Scheme(bits=bits, group_size=64)
        inc = sqnr_db(w, dequantize_weight(incoherence.quantize(w, None, scheme)))
        plain = sqnr_db(w, dequantize_weight(rtn.quantize(w, None, scheme)))
        print(f"{bits}-bit g64 weight SQNR: incoherence {inc:.2f} dB, rtn {plain:.2f} dB")
        assert inc > plain + 0.5


def outlier_inputs(k: int, t: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few channels 20x larger than the rest, as in an LLM's residual stream."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(t, k, generator=torch.Generator().manual_seed(seed + 1)) @ mix) * (torch.rand(k, generator=g) + 0.5)
    x[:, :6] *= 20.0
    return x


def out_err(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w.T
    return float((ref - x @ q.T).norm() / ref.norm())


@pytest.mark.parametrize("bits", [3, 2])
def test_quip_beats_gptq_alone(bits):
    """Same data, same solver settings (the engine's defaults at this width: act-order + MSE groups):
    the incoherence processing alone must cut the held-out output error by >= 10%."""
    w = student_t(192, 576, seed=2)
    x = outlier_inputs(576, 3072, 3)
    x_cal, x_test = x[:2048], x[2048:]                               # held-out tokens of one distribution
    stats = {"hessian": x_cal.T @ x_cal / len(x_cal)}
    scheme = Scheme(bits=bits, group_size=64)
    args = quip.scheme_defaults(scheme)
    assert args == gptq.scheme_defaults(scheme) == {"act_order": True, "mse": True}
    e_quip = out_err(w, dequantize_weight(quip.quantize(w, stats, scheme, name="l.weight", **args)), x_test)
    e_gptq = out_err(w, dequantize_weight(gptq.quantize(w, stats, scheme, name="l.weight", **args)), x_test)
    e_plain = out_err(w, dequantize_weight(quip.quantize(w, stats, scheme, name="l.weight")), x_test)
    e_clip = out_err(w, dequantize_weight(quip.quantize(w, stats, scheme, clip=True, name="l.weight")), x_test)
    print(f"{bits}-bit g64 held-out output error: quip {e_quip:.4f} (plain order, min-max groups {e_plain:.4f}, "
          f"static clipped groups {e_clip:.4f}), gptq {e_gptq:.4f}")
    assert e_quip < 0.9 * e_gptq
    assert e_clip < e_plain and e_quip < e_plain                     # MSE groups beat min-max at <= 3 bits


def test_quip_with_act_order_undoes_perm_then_transforms():
    w = student_t(64, 192, seed=4)
    x = outlier_inputs(192, 512, 5)
    stats = {"hessian": x.T @ x / len(x)}
    qw = quip.quantize(w, stats, Scheme(bits=4, group_size=64), act_order=True, name="l.weight")
    m = QuantLinear.from_qweight(qw, None, "quip")
    assert torch.allclose(m(x[:8]), x[:8] @ dequantize_weight(qw).T, atol=1e-4, rtol=1e-4)
    assert out_err(w, dequantize_weight(qw), x) < 0.15


def test_save_and_reload_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 1536), nn.SiLU(), nn.Linear(1536, 576))
    bitsmith.quantize(model, Recipe(method="incoherence", scheme=Scheme(bits=3, group_size=64), ignore=()))
    assert isinstance(model[0], HadamardLinear)
    out = bitsmith.save(model, tmp_path / "inc")
    loaded = bitsmith.load(out, nn.Sequential(nn.Linear(576, 1536), nn.SiLU(), nn.Linear(1536, 576)))
    assert isinstance(loaded[2], HadamardLinear)
    x = torch.randn(4, 576)
    assert torch.equal(model(x), loaded(x))


def block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float model's inputs to every linear of one block, (T, K) each."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, i[0].reshape(-1, i[0].shape[-1])))
             for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    with torch.inference_mode():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.slow
def test_smollm2_quip_block_beats_gptq_at_2_bits(smollm2):
    """Block 0 of the real model at 2 bits g64, both methods at the engine's defaults (act-order + MSE
    groups), Hessians from 8 x 512 calibration tokens: on held-out tokens quip's mean output error is >= 5%
    below GPTQ's, so the gain is the incoherence processing's (three blocks measured: 7% lower at 2 bits,
    9% at 3)."""
    from bitsmith.models import calibration_samples, load_text, tokenize_text

    cal_text, ev_text = load_text(None)
    block = smollm2.model.model.layers[0]
    cal = block_inputs(smollm2.model, block, calibration_samples(smollm2.tokenizer, cal_text, 8, 512))
    held = block_inputs(smollm2.model, block, tokenize_text(smollm2.tokenizer, ev_text, None)[:1024].view(2, 512))
    scheme = Scheme(bits=2, group_size=64)
    errs = {}
    for name, x in cal.items():
        w = block.get_submodule(name).weight.detach()
        stats = {"hessian": x.T @ x / len(x)}
        errs[name] = [out_err(w, dequantize_weight(m.quantize(w, stats, scheme, name=f"{name}.weight",
                                                              **m.scheme_defaults(scheme))), held[name])
                      for m in (quip, gptq)]
    print({n: (round(q, 4), round(g, 4)) for n, (q, g) in errs.items()})
    mean_quip, mean_gptq = (sum(e[i] for e in errs.values()) / len(errs) for i in (0, 1))
    assert len(errs) == 7 and mean_quip < 0.95 * mean_gptq
    assert sum(q < g for q, g in errs.values()) > len(errs) / 2
