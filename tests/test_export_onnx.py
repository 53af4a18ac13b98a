"""ONNX export (issue 6): MatMulNBits layout bit-exact against the operator's definition, every variant
run in ONNX Runtime against bitsmith's own forward, external data, static W8A8 QDQ on a digits CNN, and the
real models (4-bit SmolLM2 perplexity and greedy tokens; W8A8 MiniLM embeddings)."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch import nn

from bitsmith import Recipe, Scheme, quantize
from bitsmith.errors import BitsmithError
from bitsmith.models import LoadedModel
from bitsmith.nn import HadamardLinear, InputScaledLinear, QuantLinear, _Packed
from bitsmith.primitives import QWeight, dequantize_weight, quantize_weight

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'bitsmith[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'bitsmith[onnx]'")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript: pip install 'bitsmith[onnx]'")

from bitsmith.export import onnx as ox


def _qw(n: int, k: int, scheme: Scheme, seed: int = 0) -> QWeight:
    g = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(n, k, generator=g), scheme)


LAYOUTS = [(Scheme(bits=4, group_size=32), 100), (Scheme(bits=4, group_size=64, symmetric=True), 576),
           (Scheme(bits=8, group_size=None, symmetric=True), 576), (Scheme(bits=8, group_size=None), 33),
           (Scheme(bits=2, group_size=16), 70), (Scheme(bits=4, group_size=96), 200),
           (Scheme(bits=4, group_size=128), 576)]


@pytest.mark.parametrize("scheme,k", LAYOUTS, ids=lambda v: v.label() if isinstance(v, Scheme) else str(v))
def test_matmulnbits_layout_is_bit_exact(scheme, k):
    qw = _qw(24, k, scheme, seed=k)
    t = ox.matmulnbits_tensors(qw)
    a = t["attrs"]
    b = a["block_size"]
    assert b >= 16 and b & (b - 1) == 0                                        # the operator's rule
    assert t["B"].shape == (24, -(-k // b), b * scheme.bits // 8) and t["B"].dtype == torch.uint8
    assert t["scales"].shape == (24 * -(-k // b),)
    # the operator's definition, unpacked independently, gives exactly bitsmith's weight
    assert torch.equal(ox.dequantize_matmulnbits(t), dequantize_weight(qw))
    # first codes: low bits first within the first byte of row 0
    per = 8 // scheme.bits
    first = [(int(t["B"][0, 0, 0]) >> (i * scheme.bits)) & ((1 << scheme.bits) - 1) for i in range(per)]
    assert first == qw.codes[0, :per].tolist()


def test_fractional_zero_points_are_float():
    qw = _qw(8, 64, Scheme(bits=4, group_size=32))
    hqq = QWeight(qw.codes, qw.scale, qw.zero + 0.25, qw.scheme)
    t = ox.matmulnbits_tensors(hqq)
    assert t["zero_points"].dtype == torch.float32
    assert torch.equal(ox.dequantize_matmulnbits(t), dequantize_weight(hqq))


@pytest.mark.parametrize("scheme", [Scheme(bits=3, group_size=32), Scheme(bits=4, group_size=40),
                                    Scheme(grid="nf4", group_size=64)], ids=lambda s: s.label())
def test_matmulnbits_refuses_what_it_cannot_carry(scheme):
    with pytest.raises(BitsmithError):
        ox.matmulnbits_tensors(_qw(8, 80, scheme))


def _had_linear() -> QuantLinear:
    qw = _qw(16, 64, Scheme(bits=4, group_size=32))
    signs = {"had_in": torch.zeros(8, dtype=torch.uint8), "had_out": torch.zeros(2, dtype=torch.uint8)}
    return QuantLinear.from_qweight(QWeight(qw.codes, qw.scale, qw.zero, qw.scheme, transform=signs))


def test_unsupported_layers_fail_clearly_and_leave_the_model_untouched(tmp_path):
    model = nn.Sequential(QuantLinear.from_qweight(_qw(16, 64, Scheme(bits=4, group_size=32))), _had_linear())
    assert isinstance(model[1], HadamardLinear)
    with pytest.raises(BitsmithError, match="Hadamard"):
        ox.write(LoadedModel(model, None, "m", "module", None), tmp_path / "o", mode="matmulnbits",
                 example=(torch.randn(2, 64),))
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], HadamardLinear)   # swapped back
    with pytest.raises(BitsmithError, match="mode"):
        ox.write(LoadedModel(model, None, "m", "module", None), tmp_path / "o", mode="int3")


def _run(path, feeds: dict) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0])


def _stack() -> nn.Sequential:
    """Every MatMulNBits variant in one graph: ragged K with bias, 8-bit per-channel symmetric, 2-bit,
    fractional (HQQ) zeros, and AWQ's input scale with GPTQ's act-order permutation."""
    g = torch.Generator().manual_seed(1)
    a = QuantLinear.from_qweight(_qw(64, 100, Scheme(bits=4, group_size=32), 1), torch.randn(64, generator=g))
    b = QuantLinear.from_qweight(_qw(96, 64, Scheme(bits=8, group_size=None, symmetric=True), 2))
    c = QuantLinear.from_qweight(_qw(64, 96, Scheme(bits=2, group_size=16), 3))
    q = _qw(128, 64, Scheme(bits=4, group_size=64), 4)
    d = QuantLinear.from_qweight(QWeight(q.codes, q.scale, q.zero + 0.5, q.scheme))
    q = _qw(64, 128, Scheme(bits=4, group_size=32), 5)
    extra = {"input_scale": torch.rand(128, generator=g) + 0.5}
    e = QuantLinear.from_qweight(QWeight(q.codes, q.scale, q.zero, q.scheme, torch.randperm(128, generator=g), extra))
    assert isinstance(e, InputScaledLinear) and d.zero_kind == "float16"
    return nn.Sequential(a, nn.ReLU(), b, c, nn.ReLU(), d, e).eval()     # ReLU: exact in both runtimes


def test_every_matmulnbits_variant_runs_in_onnxruntime(tmp_path):
    model = _stack()
    x = torch.randn(3, 5, 100)
    res = ox.write(LoadedModel(model, None, "stack", "module", None), tmp_path, mode="matmulnbits", example=(x,))
    assert res["nodes"]["MatMulNBits"] == 5 and res["quantized_layers"] == 5
    onnx.checker.check_model(str(tmp_path / ox.MODEL_FILE))
    x2 = torch.randn(4, 5, 100)                                                 # another batch size
    with torch.no_grad():
        ref = model(x2)
    got = _run(tmp_path / ox.MODEL_FILE, {"input": x2})
    # five random layers grow the outputs to ~1e4: float32 summation order is all that may differ
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_external_data_for_large_models(tmp_path, tiny_llama):
    from bitsmith.models import load_model

    lm = load_model(str(tiny_llama))
    quantize(lm.model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=32)))
    res = ox.write(lm, tmp_path, external_data=True)
    assert res["mode"] == "matmulnbits" and res["external_data"] and "model.onnx.data" in res["files"]
    assert res["nodes"]["MatMulNBits"] == 14
    onnx.checker.check_model(str(tmp_path / ox.MODEL_FILE))                   # by path: external data too
    ids = torch.randint(0, 30522, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model(ids).logits
    torch.testing.assert_close(_run(tmp_path / ox.MODEL_FILE, {"input_ids": ids}), ref, rtol=1e-4, atol=1e-4)


# ---- QDQ: static W8A8 ------------------------------------------------------------------------------------
def _digits():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "digits_cnn.py")
    spec = importlib.util.spec_from_file_location("digits_cnn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def digits_cnn():
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    torch.manual_seed(0)
    return _digits().train(seed=0, epochs=10)


@pytest.mark.parametrize("how", ["w8a8", "rtn8-minmax"])
def test_w8a8_digits_cnn_gives_the_same_predictions_in_onnxruntime(digits_cnn, tmp_path, how):
    """w8a8: bitsmith's own static W8A8 (issue 7: int8 activations with calibrated scales, integer product)
    carried into QuantizeLinear/DequantizeLinear as it is; rtn8-minmax: 8-bit asymmetric weight-only layers
    get their activation ranges from the exporter's min-max pass over the calibration batches."""
    fp, (xtr, _, xte, yte) = digits_cnn
    model = copy.deepcopy(fp)
    calib = list(xtr[:256].split(64))
    if how == "w8a8":
        quantize(model, Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True), ignore=()),
                 calib_ids=xtr[:256], batch_size=64)
    else:
        quantize(model, Recipe(method="rtn", scheme=Scheme(bits=8, group_size=None), keep_dtype=None))
    res = ox.write(LoadedModel(model, None, "digits", "cnn", None), tmp_path, example=(xtr[:4],),
                   calibration=None if how == "w8a8" else calib)
    assert res["mode"] == "qdq" and res["nodes"] == {"QuantizeLinear": 4, "DequantizeLinear": 8}
    got = _run(tmp_path / ox.MODEL_FILE, {"input": xte}).argmax(-1)
    with torch.no_grad():
        ours = model(xte).argmax(-1)                    # bitsmith's forward (W8A8: its integer kernels)
    if how == "rtn8-minmax":                            # the W8A8 it becomes: the stand-ins run in torch
        names = [n for n, m in model.named_modules() if isinstance(m, _Packed)]
        undo, _ = ox.swap_for_export(model, "qdq", ox.input_ranges(model, names, model, [(b,) for b in calib]))
        with torch.no_grad():
            ours = model(xte).argmax(-1)
        ox.restore(model, undo)
    assert (got == ours).float().mean() >= 0.99
    assert (got == yte).float().mean() >= 0.9


def test_w8a8_inputs_past_the_calibrated_range_get_bitsmiths_codes(tmp_path):
    """bitsmith clamps activation codes to [-127, 127], QuantizeLinear saturates to [-128, 127]: the Max(x, -127 s)
    the exporter puts before it makes ONNX Runtime's integer product equal bitsmith's for inputs 3x past the
    calibrated range on both sides (without it, every code below -127.5 becomes -128: 1/127 of the largest
    activations wrong)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    calib = torch.randn(256, 64, generator=g)
    quantize(model, Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True), ignore=()),
             calib_ids=calib, batch_size=64)
    res = ox.write(LoadedModel(model, None, "mlp", "module", None), tmp_path, example=(calib[:4],))
    proto = onnx.load(str(tmp_path / ox.MODEL_FILE))
    assert res["nodes"]["QuantizeLinear"] == 2 and sum(n.op_type == "Max" for n in proto.graph.node) == 2
    x = 3 * float(calib.abs().max()) * (2 * torch.rand(512, 64, generator=g) - 1)
    s = float(model[0].act_scale.reshape(-1)[0])
    assert int((x / s < -127.5).sum()) > 1000                                # many codes would be -128
    with torch.no_grad():
        ref = model(x)                                   # bitsmith's W8A8 forward (integer product)
    got = _run(tmp_path / ox.MODEL_FILE, {"input": x})
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_qdq_takes_8bit_per_channel_weights_only(tmp_path):
    model = nn.Sequential(QuantLinear.from_qweight(_qw(16, 64, Scheme(bits=4, group_size=32)))).eval()
    with pytest.raises(BitsmithError, match="8-bit per-channel"):
        ox.write(LoadedModel(model, None, "m", "module", None), tmp_path / "o", mode="qdq",
                 example=(torch.randn(2, 64),), calibration=[torch.randn(4, 64)])


def test_min_max_observer_ranges_cover_the_calibration_inputs():
    from bitsmith.observers import input_ranges

    lin = nn.Linear(8, 4)
    batches = [torch.randn(5, 8) * 3, torch.randn(7, 8) - 2]
    lo, hi = input_ranges({"l": lin}, lin, batches)["l"]
    allx = torch.cat(batches)
    assert float(lo) == float(allx.min()) and float(hi) == float(allx.max())
    scale, zero = ox.activation_qparams(lo, hi)
    assert zero.dtype == torch.uint8 and abs(float(lo) / float(scale) + int(zero)) < 0.5 + 1e-4


# ---- real models ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_w4_as_matmulnbits_matches_bitsmith(smollm2, eval_text, tmp_path):
    """4-bit SmolLM2 in ONNX Runtime: perplexity within 1% of bitsmith's own forward on the same tokens, and
    the same greedy tokens for a prompt (a short slice: 2 windows of 256 tokens, 8 new tokens)."""
    from bitsmith.evaluate import eval_windows, score_windows

    model = copy.deepcopy(smollm2.model)
    quantize(model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=64)))
    lm = LoadedModel(model, smollm2.tokenizer, "smollm2-w4", "causal-lm", None)
    res = ox.write(lm, tmp_path)
    assert res["nodes"]["MatMulNBits"] == res["quantized_layers"] == 210
    sess = ort.InferenceSession(str(tmp_path / ox.MODEL_FILE), providers=["CPUExecutionProvider"])

    def ort_logits(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])

    windows = eval_windows(smollm2.tokenizer, eval_text, seq_len=256, max_tokens=512)
    ours, theirs = score_windows(model, windows), score_windows(ort_logits, windows, device="cpu")
    assert abs(theirs["ppl"] / ours["ppl"] - 1) < 0.01, (ours, theirs)
    ids = smollm2.tokenizer("The Python tutorial explains", return_tensors="pt")["input_ids"]
    a = b = ids
    with torch.no_grad():
        for _ in range(8):
            a = torch.cat([a, model(a).logits[:, -1:].argmax(-1)], 1)
            b = torch.cat([b, ort_logits(b)[:, -1:].argmax(-1)], 1)
    assert a.tolist() == b.tolist()


@pytest.mark.slow
def test_minilm_w8a8_qdq_matches_bitsmith(minilm, eval_text, tmp_path):
    """bitsmith's accurate static W8A8 MiniLM (issue 7's recipe: calibrated per-tensor int8 activations with
    SmoothQuant `auto`, smoothed at run time by a Mul before the QuantizeLinear) in ONNX Runtime: embedding
    mean cosine >= 0.999 to bitsmith's own forward. Plain min-max static W8A8 (cosine 0.983 to fp32,
    below issue 7's bar) sits on code boundaries so often that float-rounding-sized differences between ORT's
    and torch's LayerNorm/Gelu/softmax flip codes and reach mean 0.998 only; the SmoothQuant model is both
    closer to fp32 and stable under such differences (benchmarks/export_runtimes.py --smoothquant auto:
    mean 0.99975 / min 0.9992 on 64 texts). Also: ORT is as close to the float model as bitsmith is."""
    from bitsmith.evaluate import embed

    model = copy.deepcopy(minilm.model)
    # reduce_range (weights in [-64, 64]): ONNX Runtime's u8s8 int8 kernels saturate 16-bit pair sums on
    # x86 CPUs without VNNI, the same limit fbgemm has; full-range weights measured cosine 0.988 on such a
    # CPU (AVX2 only); with VNNI or reduce_range the integer products are exact
    quantize(model, Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True),
                           method_args={"reduce_range": True, "smoothquant": "auto"}),
             tokenizer=minilm.tokenizer, n_samples=16, seq_len=128)
    lm = LoadedModel(model, minilm.tokenizer, "minilm-w8a8", "encoder", None)
    res = ox.write(lm, tmp_path)
    assert res["mode"] == "qdq" and res["nodes"]["QuantizeLinear"] >= 24
    from bitsmith.nn_act import W8A8ScaledLinear

    assert sum(isinstance(m, W8A8ScaledLinear) for m in model.modules()) >= 30   # smoothed at run time
    sess = ort.InferenceSession(str(tmp_path / ox.MODEL_FILE), providers=["CPUExecutionProvider"])

    class Runtime(nn.Module):
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
            return (torch.from_numpy(sess.run(None, feeds)[0]),)

    texts = [p for p in eval_text.split("\n\n") if len(p) > 40][:32]
    got = embed(Runtime(), minilm.tokenizer, texts)
    ref = embed(model, minilm.tokenizer, texts)              # bitsmith's W8A8 forward (integer product)
    fp = embed(minilm.model, minilm.tokenizer, texts)        # the float model both approximate
    cos = (got * ref).sum(-1)
    # measured here: mean 0.99978, min 0.99904 (AVX512-VNNI host); the bar is the mean, the min guards
    # against one text drifting off (plain min-max static: min 0.983)
    assert float(cos.mean()) >= 0.999 and float(cos.min()) >= 0.998, cos
    assert abs(float((got * fp).sum(-1).mean()) - float((ref * fp).sum(-1).mean())) <= 1e-3
