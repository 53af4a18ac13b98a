"""LLM.int8() (issue 5): planted outlier features break plain int8 activations but not the mixed
decomposition; exact int8 matmul; the run-time module saves and reloads exactly; SmolLM2 perplexity."""

import copy

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import BitsmithError, Recipe, Scheme
from bitsmith.methods import llm_int8
from bitsmith.nn import (Int8MixedLinear, Int8ZeroPointLinear, QuantLinear, int8_matmul,
                         int8_matmul_reference, per_token_int8)
from bitsmith.primitives import dequantize_weight

INT8 = Scheme(bits=8, group_size=None, symmetric=True)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


OUTLIER_COLS = [7, 100, 301, 444]


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer (256, 512) and tokens (2, 32, 512) whose columns OUTLIER_COLS carry outlier features of
    magnitude ~60, as Dettmers et al. found in every layer of models past 6.7B parameters."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(256, 512, generator=g)
    bias = 0.01 * torch.randn(256, generator=g)
    x = torch.randn(2, 32, 512, generator=g)
    x[..., OUTLIER_COLS] *= 60.0
    return w, bias, x


def module(w: torch.Tensor, bias: torch.Tensor | None, threshold: float,
           activations: str = "zeropoint") -> QuantLinear:
    qw = llm_int8.quantize(w, None, INT8, threshold=threshold, activations=activations)
    return QuantLinear.from_qweight(qw, bias, "llm_int8")


def test_outlier_columns_break_plain_int8_activations_but_not_llm_int8():
    """The error that quantizing the *activations* adds (against int8 weights with float activations),
    relative to the part of the output the 508 ordinary features carry: that part is what a per-token int8
    grid stretched to +-60 wipes out."""
    w, bias, x = planted()
    mixed = module(w, bias, 6.0)
    plain = module(w, bias, float("inf"))           # every column through int8: plain W8A8 per token
    assert isinstance(mixed, Int8MixedLinear)
    wdq = dequantize_weight(mixed.qweight())
    ref = x @ wdq.t() + bias
    ordinary = x.clone()
    ordinary[..., OUTLIER_COLS] = 0.0
    part = (ordinary @ wdq.t()).norm()
    e_mixed, e_plain = float((mixed(x) - ref).norm() / part), float((plain(x) - ref).norm() / part)
    e_total = rel_err(mixed(x), x @ w.t() + bias)
    print(f"activation error / ordinary output: plain int8 {e_plain:.3f}, LLM.int8() {e_mixed:.4f}; "
          f"LLM.int8() total relative error vs fp32 {e_total:.4f}")
    assert e_plain > 0.1                    # the outliers take the int8 range of every token
    assert e_mixed < 0.02 and e_plain > 10 * e_mixed
    assert e_total < 0.01
    assert mixed(x).shape == (2, 32, 256)


@pytest.mark.parametrize("activations", llm_int8.ACTIVATIONS)
def test_without_outliers_both_paths_agree(activations):
    w, bias, x = planted(1)
    x = x.clamp(-5, 5)
    assert torch.allclose(module(w, bias, 6.0, activations)(x), module(w, bias, float("inf"), activations)(x))


def test_per_token_zero_points_round_to_the_nearest_code_and_keep_zero_exact():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g) * 3 + 0.5
    x[:, [3, 77]] = 0.0                                   # zeroed outlier columns must stay exactly 0
    x[5] = x[5].abs()                                     # a one-signed token: its range is widened to 0
    q, s, z = per_token_int8(x, zero_point=True)
    assert q.dtype == torch.int8 and int(q.min()) == -128 and int(q.max()) == 127
    back = s * (q.float() - z.float())
    assert torch.equal(back[:, [3, 77]], torch.zeros(64, 2))
    assert float(((back - x).abs() / s).max()) <= 0.5 + 1e-4
    assert float(((back - x).abs() / s).max()) > 0.45     # really rounding to the step s, not finer


def test_zero_point_module_is_its_fake_quant_exactly():
    """The int8 x int8 path with the zero-point correction computes s * (q - z) @ W_dq^T, plus the float
    outlier columns."""
    w, bias, x = planted(5)
    mod = module(w, bias, 6.0)
    assert type(mod) is Int8ZeroPointLinear
    x2 = x.reshape(-1, 512)
    cols = (x2.abs() > 6.0).any(0)
    q, s, z = per_token_int8(x2.masked_fill(cols, 0.0), zero_point=True)
    wdq = dequantize_weight(mod.qweight())
    want = (s * (q.float() - z.float())) @ wdq.t() + x2[:, cols] @ wdq[:, cols].t() + bias
    assert torch.allclose(mod(x).reshape(-1, 256), want, rtol=1e-5, atol=1e-5)


def test_zero_points_beat_absmax_on_a_one_signed_channel_under_the_threshold():
    """SmolLM2's q/k/v inputs: a channel of magnitude 4-5.8, one sign, in every token, just under the
    threshold 6 so it stays in the int8 path. absmax spends the codes of the other sign on nothing; the
    zero point uses them, so the ordinary features' rounding error drops by about (5.8 + 1) / (2 * 5.8)."""
    g = torch.Generator().manual_seed(6)
    w = 0.02 * torch.randn(256, 512, generator=g)
    x = 0.25 * torch.randn(4, 64, 512, generator=g)
    x[..., 40] = -(4.0 + 1.8 * torch.rand(4, 64, generator=g))
    errs = {}
    for act in llm_int8.ACTIVATIONS:
        mod = module(w, None, 6.0, act)
        ref = x @ dequantize_weight(mod.qweight()).t()      # int8 weights, float activations
        errs[act] = rel_err(mod(x), ref)
    print(f"activation rounding error: absmax {errs['absmax']:.5f}, zeropoint {errs['zeropoint']:.5f}")
    assert errs["zeropoint"] < 0.7 * errs["absmax"]


def test_int8_matmul_is_exact():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (40, 3000), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (3000, 24), generator=g, dtype=torch.int8)
    exact = (a.long() @ b.long()).to(torch.int32)
    assert torch.equal(int8_matmul_reference(a, b), exact)
    assert torch.equal(int8_matmul(a, b), exact)
    if hasattr(torch, "_int_mm"):            # the fast path the module uses on CUDA, checked here on CPU
        try:
            fast = torch._int_mm(a, b)
        except RuntimeError:
            pytest.skip("torch._int_mm is not implemented on this CPU build")
        assert torch.equal(fast, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch._int_mm path)")
@pytest.mark.parametrize("activations", llm_int8.ACTIVATIONS)
def test_cuda_path_gives_the_cpu_numbers(activations):
    """On CUDA the int8 product runs through torch._int_mm (M > 16): its int32 sums must equal the exact
    reference, and the module's outputs (outlier columns, zero-point correction, scales) the CPU module's."""
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-128, 128, (64, 4096), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (4096, 256), generator=g, dtype=torch.int8)
    assert torch.equal(int8_matmul(a.cuda(), b.cuda()).cpu(), int8_matmul_reference(a, b))
    w, bias, x = planted(5)
    cpu = module(w, bias, 6.0, activations)
    gpu = copy.deepcopy(cpu).cuda()
    y_cpu, y_gpu = cpu(x), gpu(x.cuda()).cpu()
    assert y_gpu.shape == y_cpu.shape
    # not bit-exact: x / scale may round a tie differently on the GPU (one code, ~1e-5 of the output); a
    # dropped zero-point correction or outlier column would be > 1e-2
    assert rel_err(y_gpu, y_cpu) < 1e-3, rel_err(y_gpu, y_cpu)


def test_weights_are_row_wise_int8():
    w, _, _ = planted(3)
    qw = llm_int8.quantize(w, None, Scheme(bits=4, group_size=64))     # the method's format wins
    assert (qw.scheme.bits, qw.scheme.group_size, qw.scheme.symmetric) == (8, None, True)
    assert qw.scale.shape == (256, 1)
    assert int(qw.codes.min()) >= 1 and int(qw.codes.max()) <= 255    # -127..127 stored + 128


@pytest.mark.parametrize("activations, cls",
                         [("zeropoint", Int8ZeroPointLinear), ("absmax", Int8MixedLinear)])
def test_save_and_reload_exactly(tmp_path, activations, cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 64))
    args = {"threshold": 4.0, "activations": activations}
    bitsmith.quantize(model, Recipe(method="llm_int8", scheme=INT8, ignore=(), method_args=args))
    assert type(model[0]) is cls and float(model[0].outlier_threshold) == 4.0
    out = bitsmith.save(model, tmp_path / "int8")
    fresh = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 64))
    loaded = bitsmith.load(out, fresh)
    assert type(loaded[0]) is cls and float(loaded[0].outlier_threshold) == 4.0
    x = torch.randn(5, 512) * 3
    assert torch.equal(model(x), loaded(x))


def test_bad_threshold_and_activations():
    with pytest.raises(BitsmithError, match="threshold"):
        llm_int8.quantize(torch.randn(8, 16), None, INT8, threshold=0.0)
    with pytest.raises(BitsmithError, match="activations must be one of zeropoint, absmax"):
        llm_int8.quantize(torch.randn(8, 16), None, INT8, activations="minmax")


@pytest.mark.slow
def test_smollm2_perplexity_at_the_default_threshold(smollm2, eval_text):
    """The issue's bar on the issue's protocol (seq-len 1024, 4096 held-out tokens): 1% perplexity at the
    paper's threshold 6.0 with the default zeropoint activations (lm_head stays float, as transformers'
    bitsandbytes integration leaves it); measured +0.27%. The full 4096 tokens because perplexity with int8
    activations moves by ~0.3% with mere float rounding (one flipped rounding cascades) and more on fewer
    tokens (+0.85% on the first 2048). absmax activations (bitsandbytes' scheme) miss the bar here, +1.5%:
    the README's issue-5 section has the attribution."""
    from bitsmith.evaluate import perplexity

    m = copy.deepcopy(smollm2.model)
    bitsmith.quantize(m, Recipe(method="llm_int8", scheme=INT8))
    first = next(mod for mod in m.modules() if isinstance(mod, Int8MixedLinear))
    assert type(first) is Int8ZeroPointLinear and float(first.outlier_threshold) == 6.0
    kw = {"seq_len": 1024, "max_tokens": 4096}
    ref = perplexity(smollm2.model, smollm2.tokenizer, eval_text, **kw)["ppl"]
    q = perplexity(m, smollm2.tokenizer, eval_text, **kw)["ppl"]
    print(f"fp32 {ref:.4f}, LLM.int8() threshold 6 {q:.4f} ({100 * (q / ref - 1):+.2f}%)")
    assert abs(q / ref - 1) < 0.01
