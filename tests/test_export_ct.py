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


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_pack_quantized_is_bit_exact_with_the_package(scheme):
    """The package's own decompressor turns bitsmith's tensors into exactly bitsmith's weight."""
    pytest.importorskip("compressed_tensors", reason="pip install 'bitsmith[compressed-tensors]'")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qw = _qw(40, 192, scheme, seed=scheme.bits)
    t = ct.pack_quantized_tensors(qw, "layer")
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (40, -(-192 * scheme.bits // 32))
    args = ct.weight_args(qw)
    qscheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    state = {k: v for k, v in t.items()}
    state["weight_scale"] = state["weight_scale"].float()        # dequantize in float32, as bitsmith does
    out = PackedQuantizationCompressor.decompress(state, qscheme)
    assert torch.equal(out["weight"].float(), dequantize_weight(qw))


def test_refuses_what_pack_quantized_cannot_hold():
    with pytest.raises(BitsmithError, match="divide"):
        ct.pack_quantized_tensors(_qw(8, 100, Scheme(bits=4, group_size=32)), "x")     # ragged last group
    qw = _qw(8, 64, Scheme(bits=4, group_size=32))
    with pytest.raises(BitsmithError, match="fractional"):
        ct.pack_quantized_tensors(QWeight(qw.codes, qw.scale, qw.zero + 0.5, qw.scheme), "x")
    with pytest.raises(BitsmithError, match="nf4"):
        ct.pack_quantized_tensors(_qw(8, 64, Scheme(grid="nf4", group_size=32)), "x")


def _export_and_load(lm: LoadedModel, path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors", reason="pip install 'bitsmith[compressed-tensors]'")
    res = ct.write(lm, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return res, hf.eval()


# compressed-tensors 0.20's loader builds the zero point unpacked (N, G) at model init, but its decompressor
# reads it packed (what its own compressor writes, and what we write): asymmetric checkpoints fail to load.
ASYM_UPSTREAM = pytest.mark.xfail(reason="compressed-tensors: asymmetric pack-quantized does not load in "
                                         "transformers (upstream zero-point shape bug); layout checked above",
                                  strict=False)


@pytest.mark.parametrize("symmetric", [True, pytest.param(False, marks=ASYM_UPSTREAM)], ids=["sym", "asym"])
def test_transformers_loads_the_export_with_bitsmiths_logits(tiny_llama, tmp_path, symmetric):
    from bitsmith.models import load_model

    lm = load_model(str(tiny_llama))
    quantize(lm.model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=32, symmetric=symmetric)))
    res, hf = _export_and_load(lm, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert res["quantized_layers"] == 14 and cfg["ignore"] == ["lm_head"]
    ids = torch.randint(0, 30522, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_smollm2_w4_loads_in_transformers_within_fp16_tolerance(smollm2, tmp_path):
    model = copy.deepcopy(smollm2.model)
    quantize(model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=64, symmetric=True)))
    _, hf = _export_and_load(LoadedModel(model, smollm2.tokenizer, "smollm2-w4", "causal-lm", None), tmp_path)
    ids = smollm2.tokenizer("The Python tutorial explains how to", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert float((ours - theirs).abs().max()) <= 1e-3 * float(ours.abs().max())        # fp16 tolerance
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
