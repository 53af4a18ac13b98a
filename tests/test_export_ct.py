"""compressed-tensors export (issue 6): the pack-quantized tensors are bit-exact against the package's own
unpacking and dequantization, and transformers (with compressed-tensors) loads the directory with
`from_pretrained` on CPU and gives bitsmith's logits (tiny Llama: every layer; SmolLM2: the real model)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bitsmith import Recipe, Scheme, quantize
from bitsmith.errors import BitsmithError
from bitsmith.export import compressed_tensors as ct
from bitsmith.models import LoadedModel
from bitsmith.primitives import QWeight, dequantize_weight, quantize_weight

SCHEMES = [Scheme(bits=4, group_size=32), Scheme(bits=4, group_size=64, symmetric=True),
           Scheme(bits=8, group_size=None, symmetric=True), Scheme(bits=3, group_size=32),
           Scheme(bits=8, group_size=None)]


def _qw(n: int, k: int, scheme: Scheme, seed: int = 0) -> QWeight:
    return quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), scheme)


CASES = [(s, "group") for s in SCHEMES] + [(s, "block") for s in SCHEMES if not s.symmetric]


def _case_id(case) -> str:
    return f"{case[0].label()}-{case[1]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pack_quantized_is_bit_exact_with_the_package(case):
    """The package's own decompressor turns bitsmith's tensors into exactly bitsmith's weight."""
    pytest.importorskip("compressed_tensors", reason="pip install 'bitsmith[compressed-tensors]'")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme, strategy = case
    qw = _qw(40, 192, scheme, seed=scheme.bits)
    t = ct.pack_quantized_tensors(qw, "layer", strategy)
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (40, -(-192 * scheme.bits // 32))
    args = ct.weight_args(qw, strategy)
    qscheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    state = {k: v for k, v in t.items()}
    state["weight_scale"] = state["weight_scale"].float()        # dequantize in float32, as bitsmith does
    out = PackedQuantizationCompressor.decompress(state, qscheme)
    assert torch.equal(out["weight"].float(), dequantize_weight(qw))


@pytest.mark.parametrize("case", [c for c in CASES if not c[0].symmetric], ids=_case_id)
def test_asymmetric_tensors_are_the_packages_own(case):
    """The format's ground truth: compressed-tensors' own compressor, given bitsmith's float weight, scale and
    (signed) zero point, writes byte-identical weight_packed and weight_zero_point."""
    pytest.importorskip("compressed_tensors", reason="pip install 'bitsmith[compressed-tensors]'")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme, strategy = case
    qw = _qw(40, 192, scheme, seed=scheme.bits + 1)
    args = ct.weight_args(qw, strategy)
    qscheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    signed_zero = qw.zero.float() - 2 ** (scheme.bits - 1)
    theirs = PackedQuantizationCompressor.compress(
        {"weight": dequantize_weight(qw), "weight_scale": qw.scale.float(),
         "weight_zero_point": signed_zero.to(qscheme.weights.zp_dtype)}, qscheme)
    ours = ct.pack_quantized_tensors(qw, "layer", strategy)
    for key in ("weight_packed", "weight_zero_point", "weight_shape"):
        assert theirs[key].dtype == ours[key].dtype and torch.equal(theirs[key], ours[key]), key


def test_refuses_what_pack_quantized_cannot_hold():
    with pytest.raises(BitsmithError, match="divide"):
        ct.pack_quantized_tensors(_qw(8, 100, Scheme(bits=4, group_size=32)), "x")     # ragged last group
    qw = _qw(8, 64, Scheme(bits=4, group_size=32))
    with pytest.raises(BitsmithError, match="fractional"):
        ct.pack_quantized_tensors(QWeight(qw.codes, qw.scale, qw.zero + 0.5, qw.scheme), "x")
    with pytest.raises(BitsmithError, match="nf4"):
        ct.pack_quantized_tensors(_qw(8, 64, Scheme(grid="nf4", group_size=32)), "x")


def _export_and_load(lm: LoadedModel, path, asym_strategy: str = "group", **load):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors", reason="pip install 'bitsmith[compressed-tensors]'")
    res = ct.write(lm, path, asym_strategy=asym_strategy)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                           **load)
    return res, hf.eval()


def _tiny_w4(tiny_llama, symmetric: bool):
    from bitsmith.models import load_model

    lm = load_model(str(tiny_llama))
    quantize(lm.model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=32, symmetric=symmetric)))
    return lm


def _assert_bitsmiths_logits(lm: LoadedModel, hf, tmp_path, tol: float) -> None:
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert sum(len(g["targets"]) for g in cfg["config_groups"].values()) == 14 and cfg["ignore"] == ["lm_head"]
    ids = torch.randint(0, 30522, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model(ids).logits, rtol=tol, atol=tol)


@pytest.mark.parametrize("symmetric,strategy", [(True, "group"), (False, "block")], ids=["sym", "asym-block"])
def test_transformers_loads_the_export_with_bitsmiths_logits(tiny_llama, tmp_path, symmetric, strategy):
    """Default `from_pretrained`: symmetric layers, and asymmetric ones written as strategy block."""
    lm = _tiny_w4(tiny_llama, symmetric)
    _, hf = _export_and_load(lm, tmp_path, asym_strategy=strategy)
    _assert_bitsmiths_logits(lm, hf, tmp_path, 1e-3)


def test_transformers_dequantize_loads_the_asymmetric_group_export(tiny_llama, tmp_path):
    """The package's own asymmetric layout (strategy group, packed zero points) through transformers'
    `dequantize=True` load, which unpacks the zero point with the checkpoint's weight_shape; the weight is
    dequantized in the scale's dtype (fp16), hence the fp16 tolerance."""
    transformers = pytest.importorskip("transformers")
    lm = _tiny_w4(tiny_llama, symmetric=False)
    res, hf = _export_and_load(lm, tmp_path, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    assert any("asym_strategy=block" in n for n in res["notes"])
    _assert_bitsmiths_logits(lm, hf, tmp_path, 2e-3)


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=(
    "compressed-tensors 0.18-0.20.1: PackedQuantizationCompressor.compress returns early for meta weights "
    "(`if weight.device.type == \"meta\"`) without packing weight_zero_point, so transformers' model keeps it "
    "(N, G) and the packed (N*bits/32, G) checkpoint tensor is a size mismatch; 0.17.1 loaded it. Strict: "
    "an upstream fix makes this pass, and the README's compressed-tensors note must then change."))
def test_transformers_default_load_of_the_asymmetric_group_export(tiny_llama, tmp_path):
    lm = _tiny_w4(tiny_llama, symmetric=False)
    _, hf = _export_and_load(lm, tmp_path)
    _assert_bitsmiths_logits(lm, hf, tmp_path, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("symmetric,strategy", [(True, "group"), (False, "block")], ids=["sym", "asym-block"])
def test_smollm2_w4_loads_in_transformers_within_fp16_tolerance(smollm2, tmp_path, symmetric, strategy):
    model = copy.deepcopy(smollm2.model)
    quantize(model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=64, symmetric=symmetric)))
    _, hf = _export_and_load(LoadedModel(model, smollm2.tokenizer, "smollm2-w4", "causal-lm", None), tmp_path,
                             asym_strategy=strategy)
    ids = smollm2.tokenizer("The Python tutorial explains how to", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert float((ours - theirs).abs().max()) <= 1e-3 * float(ours.abs().max())        # fp16 tolerance
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
