"""MLX export (issue 6): bitsmith's codes in mlx's packing, checked bit-exactly against mlx.core's own
dequantize; mlx-lm loads the export and matches bitsmith's logits and greedy tokens (tiny Llama at every
bit width mlx has; the real SmolLM2 in the slow test)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from bitsmith import Recipe, Scheme, quantize
from bitsmith.errors import BitsmithError
from bitsmith.export import mlx as mlx_export
from bitsmith.models import LoadedModel
from bitsmith.packing import pack
from bitsmith.primitives import QWeight, dequantize_weight, quantize_weight


def _qw(n: int, k: int, scheme: Scheme, seed: int = 0) -> QWeight:
    return quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), scheme)


def _numpy_unpack(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """mlx's documented packing, reimplemented: codes LSB-first, one continuous bit stream per row of
    little-endian uint32 words."""
    stream = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, : k * bits]
    return (stream.reshape(words.shape[0], k, bits) << np.arange(bits)).sum(-1)


@pytest.mark.parametrize("scheme", [Scheme(bits=4, group_size=64), Scheme(bits=3, group_size=32),
                                    Scheme(bits=8, group_size=None, symmetric=True), Scheme(bits=6, group_size=128),
                                    Scheme(bits=2, group_size=256)], ids=lambda s: s.label())
def test_layout_is_bit_exact(scheme):
    qw = _qw(24, 256, scheme, seed=scheme.bits)
    t = mlx_export.mlx_tensors(qw, torch.float32)
    words = t["weight"].view(torch.int32).numpy().view(np.uint32)
    assert words.shape == (24, 256 * scheme.bits // 32)
    assert np.array_equal(_numpy_unpack(words, scheme.bits, 256), qw.codes.numpy())
    assert torch.equal(t["weight"].view(torch.uint8), pack(qw.codes, scheme.bits))
    gm = t["group_size"]
    scale = np.repeat(t["scales"].numpy(), gm, axis=1)
    bias = np.repeat(t["biases"].numpy(), gm, axis=1)
    w = scale * qw.codes.numpy() + bias                                         # mlx: w = scale * q + bias
    assert np.allclose(w, dequantize_weight(qw).numpy(), rtol=0, atol=1e-6)
    mx = pytest.importorskip("mlx.core", reason="pip install 'bitsmith[mlx]'")
    got = mx.dequantize(mx.array(words), mx.array(t["scales"].numpy()), mx.array(t["biases"].numpy()),
                        group_size=gm, bits=scheme.bits)
    assert np.array_equal(np.array(got), w.astype(np.float32))


def test_refuses_what_mlx_cannot_hold():
    with pytest.raises(BitsmithError, match="32, 64 or 128"):
        mlx_export.mlx_tensors(_qw(8, 100, Scheme(bits=4, group_size=50)))
    with pytest.raises(BitsmithError, match="nf4"):
        mlx_export.mlx_tensors(_qw(8, 64, Scheme(grid="nf4", group_size=32)))
    with pytest.raises(BitsmithError, match="act-order"):
        qw = _qw(8, 64, Scheme(bits=4, group_size=32))
        mlx_export.mlx_tensors(QWeight(qw.codes, qw.scale, qw.zero, qw.scheme, torch.randperm(64)))


def _load_and_compare(lm: LoadedModel, path, prompt: torch.Tensor, new_tokens: int, tol: float):
    pytest.importorskip("mlx.core", reason="pip install 'bitsmith[mlx]'")
    pytest.importorskip("mlx_lm", reason="pip install 'bitsmith[mlx]'")
    import mlx.core as mx
    from mlx_lm.utils import load_model

    res = mlx_export.write(lm, path, dtype="float32")
    model, _ = load_model(path)
    with torch.no_grad():
        ours = lm.model(prompt).logits
    theirs = torch.from_numpy(np.array(model(mx.array(prompt.numpy()))))
    assert float((ours - theirs).abs().max()) <= tol * float(ours.abs().max())
    a = b = prompt
    with torch.no_grad():
        for _ in range(new_tokens):                  # greedy, full recompute: the same tokens from both
            a = torch.cat([a, lm.model(a).logits[:, -1:].argmax(-1)], 1)
            nxt = np.array(model(mx.array(b.numpy()))[:, -1:].argmax(-1)).astype(np.int64)
            b = torch.cat([b, torch.from_numpy(nxt)], 1)
    assert a.tolist() == b.tolist()
    return res


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64), (8, 128)])
def test_mlx_lm_loads_the_export_and_generates_the_same_tokens(tiny_llama, tmp_path, bits, group):
    from bitsmith.models import load_model

    lm = load_model(str(tiny_llama))
    quantize(lm.model, Recipe(method="rtn", scheme=Scheme(bits=bits, group_size=group)))
    prompt = torch.randint(0, 30522, (1, 9), generator=torch.Generator().manual_seed(bits))
    res = _load_and_compare(lm, tmp_path, prompt, 4, 1e-5)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rp = getattr(lm.model.config, "rope_parameters", None) or {}
    if "rope_theta" in rp:                       # mlx-lm reads the top-level key (transformers 5 nests it)
        assert cfg["rope_theta"] == rp["rope_theta"]
    q = cfg["quantization"]
    assert (q["group_size"], q["bits"]) == (min(group, 64), bits) and res["quantized_layers"] == 14
    # down_proj (K = 160) takes 32-column MLX groups when 64 does not divide K: a per-layer override
    assert all(v == {"group_size": 32, "bits": bits} for k, v in q.items() if k not in ("group_size", "bits"))


@pytest.mark.slow
def test_smollm2_w4_loads_in_mlx_lm(smollm2, tmp_path):
    model = copy.deepcopy(smollm2.model)
    quantize(model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=64)))
    lm = LoadedModel(model, smollm2.tokenizer, "smollm2-w4", "causal-lm", None)
    ids = smollm2.tokenizer("The Python tutorial explains", return_tensors="pt")["input_ids"]
    _load_and_compare(lm, tmp_path, ids, 8, 1e-4)


def test_cli_exports_a_checkpoint_and_bad_options_are_one_line_errors(tiny_llama, tmp_path, capsys):
    import bitsmith
    from bitsmith.models import load_model
    from tests.helpers import one_line_error, run_cli

    lm = load_model(str(tiny_llama))
    quantize(lm.model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=32)))
    ckpt = bitsmith.save(lm.model, tmp_path / "q", tokenizer=lm.tokenizer)
    code, out, _ = run_cli(["export", ckpt, "--format", "mlx", "-o", tmp_path / "mlx", "--json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["quantized_layers"] == 14
    assert (tmp_path / "mlx" / "model.safetensors").is_file() and (tmp_path / "mlx" / "tokenizer.json").is_file()
    code, _, err = run_cli(["export", ckpt, "--format", "mlx", "-o", tmp_path / "m2", "--option", "dtype=int7"], capsys)
    one_line_error(code, err, "dtype")
    assert not (tmp_path / "m2").exists()


def test_nested_rope_parameters_are_written_where_mlx_lm_reads_them():
    assert mlx_export.legacy_rope({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}) == {
        "rope_theta": 1e5}
    scaled = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    assert mlx_export.legacy_rope({"rope_parameters": scaled}) == {
        "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert mlx_export.legacy_rope({"rope_theta": 1e4}) == {}
