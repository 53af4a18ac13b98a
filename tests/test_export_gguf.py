"""GGUF export: block encoders bit-exact against the gguf package's reference quantizers, lossless repacking
of QWeights, a tiny-Llama export -> import -> export round trip, the export registry and CLI errors, and the
real SmolLM2 Q4_1 file imported and written again byte for byte (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from bitsmith import cli  # noqa: E402
from bitsmith.errors import BitsmithError  # noqa: E402
from bitsmith.export import export, format_module  # noqa: E402
from bitsmith.export import gguf_blocks as gb  # noqa: E402
from bitsmith.primitives import dequantize_weight, quantize_weight  # noqa: E402

Q = gguf.GGMLQuantizationType
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    w[0, :32] = 0.0                      # an all-zero block (scale 0)
    if n > 2:
        w[1, 3], w[1, 7] = 5.0, -5.0    # equal |max| in one block: the first one decides the sign
        w[2, 40 % k] = 1e4               # an outlier
    return w


@pytest.mark.parametrize("qtype", LEGACY)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (7, 576), (33, 160)])
def test_encoder_matches_gguf_reference(qtype, shape):
    w = _weights(*shape)
    ref = gguf.quants.quantize(w.numpy(), Q[qtype])
    ours = gb.encode(w, qtype).numpy()
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_blocks_to_qweight_and_back_is_byte_identical(qtype):
    w = _weights(6, 512, seed=1)
    # Not the 1e4 outlier: it drives neighbouring K-quant sub-scales to 0, and a sub-block with scale 0 but
    # a non-zero min (a constant) has no QWeight form; such a tensor is re-encoded instead (next test).
    w[2, 40] = 0.0
    blocks = gb.encode(w, qtype)
    qw = gb.to_qweight(blocks, qtype, tuple(w.shape))
    assert gb.lossless_reason(qw, qtype) is None
    assert torch.equal(gb.from_qweight(qw, qtype), blocks)
    # bitsmith's dequantization of the imported codes is ggml's, to float32 rounding
    ref = gguf.quants.dequantize(blocks.numpy(), Q[qtype])
    np.testing.assert_allclose(dequantize_weight(qw).numpy(), ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))


def test_kquant_constant_sub_block_import_is_flagged(caplog):
    w = torch.randn(2, 256, generator=torch.Generator().manual_seed(1)) - 1.0   # every sub-block has a min
    blocks = gb.encode(w, "Q4_K")
    blocks[:, 4] &= 0xC0        # sub-block 0: 6-bit scale 0, min kept: a constant, which no QWeight holds
    with caplog.at_level("WARNING"):
        qw = gb.to_qweight(blocks, "Q4_K", (2, 256))
    assert "2 Q4_K block(s) hold a constant" in caplog.text
    ref = gguf.quants.dequantize(blocks.numpy(), Q["Q4_K"])
    assert np.abs(ref[:, 32:] - dequantize_weight(qw).numpy()[:, 32:]).max() < 1e-5    # the rest is exact


@pytest.mark.parametrize("qtype,floor", [("Q4_K", 20.0), ("Q5_K", 26.0), ("Q6_K", 32.0)])
def test_kquant_encoders_decode_with_gguf_and_meet_sqnr(qtype, floor):
    w = torch.randn(16, 768, generator=torch.Generator().manual_seed(2))
    deq = gguf.quants.dequantize(gb.encode(w, qtype).numpy(), Q[qtype])
    sqnr = 10 * np.log10((w.numpy() ** 2).sum() / ((w.numpy() - deq) ** 2).sum())
    assert sqnr >= floor


@pytest.mark.parametrize("qtype", LEGACY)
def test_gguf_compatible_scheme_exports_losslessly(qtype):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(3))
    qw = quantize_weight(w, gb.gguf_scheme(qtype))
    assert gb.lossless_reason(qw, qtype) is None
    got = gguf.quants.dequantize(gb.from_qweight(qw, qtype).numpy(), Q[qtype])
    want = dequantize_weight(qw).numpy()
    if gb.BLOCK_TYPES[qtype].symmetric:
        assert np.array_equal(got, want)          # codes and f16 scales carried over exactly
    else:                                         # the min -zero*scale is rounded to f16
        assert np.abs(got - want).max() <= 2.0 ** -10 * np.abs(want).max()


def test_tensor_types_follow_llama_quantize():
    from bitsmith.export.gguf import tensor_type

    assert tensor_type("Q4_K_M", "blk.0.attn_v.weight", 4096, 32, is_output=False) == "Q6_K"    # more bits
    assert tensor_type("Q4_K_M", "blk.5.attn_v.weight", 4096, 32, is_output=False) == "Q4_K"
    assert tensor_type("Q4_K_M", "blk.5.attn_q.weight", 576, 30, is_output=False) == "Q5_0"     # K % 256
    assert tensor_type("Q4_1", "token_embd.weight", 576, 30, is_output=True) == "Q8_0"         # Q6_K -> Q8_0
    assert tensor_type("Q4_0", "blk.0.ffn_up.weight", 100, 30, is_output=False) == "F16"       # K % 32


def test_lossless_refuses_other_grids():
    w = torch.randn(4, 128)
    from bitsmith.recipe import Scheme

    assert "group size" in gb.lossless_reason(quantize_weight(w, Scheme(bits=4, group_size=64)), "Q4_1")
    assert "grid" in gb.lossless_reason(quantize_weight(w, Scheme(bits=4, group_size=32)), "Q4_0")
    with pytest.raises(BitsmithError, match="K-quants"):
        gb.gguf_scheme("Q4_K")
    with pytest.raises(BitsmithError, match="not a multiple of Q8_0.s block of 32"):
        gb.encode(torch.randn(2, 33), "Q8_0")


# ---- a tiny Llama with a byte-level BPE tokenizer --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bpe_llama(tmp_path_factory):
    """A 2-block Llama (K = 64, 128 and 256 so every block type applies) with a small trained BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tinybpe") / "tiny-bpe-llama"
    d.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    from bitsmith.models import default_text

    tok.train_from_iterator([default_text()[:4000]], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
    fast.save_pretrained(str(d))
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))


def _tensor_bytes(path) -> dict[str, tuple[str, bytes]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


def test_tiny_llama_quantized_exports_losslessly_and_imports_back(tiny_bpe_llama, tmp_path, own_cache):
    from bitsmith.apply import quantize_model
    from bitsmith.importers.gguf import load
    from bitsmith.models import load_any
    from bitsmith.recipe import Recipe

    lm = load_any(str(tiny_bpe_llama))
    quantize_model(lm.model, Recipe(scheme=gb.gguf_scheme("Q4_0")), progress=False)
    ids = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 81]])
    with torch.no_grad():
        ref = lm.model(ids).logits
    out = tmp_path / "tiny.gguf"
    summary = export(lm, "gguf", out)
    assert summary["lossless"] == 14 and summary["re_encoded"] == 0     # 7 linears x 2 blocks
    assert summary["tensors"]["token_embd.weight"]["type"] == "F16"       # float embedding, no --type
    back = load(out)
    with torch.no_grad():
        got = back.model(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3)              # F16 embedding / head rounding only
    q0 = lm.model.model.layers[1].self_attn.k_proj.qweight()
    q1 = back.model.model.layers[1].self_attn.k_proj.qweight()
    assert torch.equal(q0.codes, q1.codes) and torch.equal(q0.scale, q1.scale)   # Q/K permutation undone
    again = tmp_path / "again.gguf"
    export(back, "gguf", again)
    assert _tensor_bytes(again) == _tensor_bytes(out)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_1", "Q8_0"])
def test_tiny_llama_float_export_reimports_byte_identically(tiny_bpe_llama, tmp_path, own_cache, ftype):
    from bitsmith.importers.gguf import load
    from bitsmith.models import load_any

    out = tmp_path / "a.gguf"
    s = export(load_any(str(tiny_bpe_llama)), "gguf", out, type=ftype)
    types = {r["type"] for r in s["tensors"].values()}
    if ftype == "Q4_K_M":     # Q6_K for the tied embedding/head and the "more bits" attn_v / ffn_down layers
        assert types == {"Q4_K", "Q6_K"}
    again = tmp_path / "b.gguf"
    s2 = export(load(out), "gguf", again, type=ftype)
    assert s2["re_encoded"] == 0
    assert _tensor_bytes(again) == _tensor_bytes(out)


def test_unsupported_architecture_names_supported_and_writes_nothing(tmp_path):
    from bitsmith.models import LoadedModel

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    lm = LoadedModel(transformers.GPT2LMHeadModel(cfg), None, "gpt2-tiny", "causal-lm", None)
    with pytest.raises(BitsmithError, match="llama, mistral, qwen2.*gpt2"):
        export(lm, "gguf", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_never_overwrites_and_rejects_unknown_options(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(BitsmithError, match="already exists"):
        export(None, "gguf", out)
    with pytest.raises(BitsmithError, match="no option.*bogus"):
        export(None, "gguf", out, overwrite=True, bogus=1)
    with pytest.raises(BitsmithError, match="unknown export format"):
        format_module("safetensors-ish")
    assert out.read_bytes() == b"keep"


def test_cli_export_errors_are_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["export", "smollm2-135m", "--format", "nope", "-o", str(tmp_path / "x")]) == 2
    assert cli.main(["export", "smollm2-135m", "--format", "gguf", "-o", str(tmp_path / "x"),
                     "--option", "bogus=1"]) == 2
    assert cli.main(["export", "smollm2-135m", "--format", "gguf", "-o", str(tmp_path / "x"),
                     "--type", "Q3_XL"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("bitsmith: error:") for line in err)
    assert "Traceback" not in "".join(err)


def test_cli_export_tiny_llama_json(tiny_bpe_llama, tmp_path, capsys, own_cache):
    out = tmp_path / "cli.gguf"
    assert cli.main(["export", str(tiny_bpe_llama), "--format", "gguf", "--type", "Q8_0", "-o", str(out),
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bytes"] == out.stat().st_size and summary["type"] == "Q8_0"
    assert cli.main(["export", str(tiny_bpe_llama), "--format", "gguf", "-o", str(out)]) == 2   # exists


def test_cli_exports_a_bitsmith_checkpoint_losslessly(tiny_bpe_llama, tmp_path, capsys, own_cache):
    from bitsmith import checkpoint
    from bitsmith.apply import quantize_model
    from bitsmith.models import load_any
    from bitsmith.recipe import Recipe

    lm = load_any(str(tiny_bpe_llama))
    quantize_model(lm.model, Recipe(scheme=gb.gguf_scheme("Q4_1")), progress=False)
    ckpt = tmp_path / "ckpt"
    checkpoint.save(lm.model, ckpt, tokenizer=lm.tokenizer)
    out = tmp_path / "ckpt.gguf"
    assert cli.main(["export", str(ckpt), "--format", "gguf", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lossless"] == 14 and summary["re_encoded"] == 0
    assert {r["type"] for n, r in summary["tensors"].items() if n.startswith("blk.")} == {"Q4_1"}


def test_runtime_transform_layer_is_re_encoded_with_its_transform_folded(tiny_bpe_llama, tmp_path):
    import dataclasses

    from bitsmith.apply import quantize_model
    from bitsmith.models import load_any
    from bitsmith.nn import QuantLinear
    from bitsmith.recipe import Recipe
    from bitsmith.select import set_submodule

    lm = load_any(str(tiny_bpe_llama))
    quantize_model(lm.model, Recipe(scheme=gb.gguf_scheme("Q8_0")), progress=False)
    name = "model.layers.0.mlp.up_proj"
    qw = lm.model.get_submodule(name).qweight()
    scaled = dataclasses.replace(qw, transform={"input_scale": torch.linspace(0.5, 2.0, qw.shape[1])})
    set_submodule(lm.model, name, QuantLinear.from_qweight(scaled))         # AWQ's InputScaledLinear
    out = tmp_path / "t.gguf"
    s = export(lm, "gguf", out)
    rep = s["tensors"]["blk.0.ffn_up.weight"]
    assert rep["path"] == "re-encoded" and rep["sqnr_db"] > 35 and s["lossless"] == 13
    assert any("up_proj" in w and "SQNR" in w for w in s["warnings"])
    t = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ffn_up.weight")
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    want = dequantize_weight(scaled).numpy()
    assert 10 * np.log10((want ** 2).sum() / ((want - got) ** 2).sum()) > 35


def test_failed_write_leaves_no_file(tiny_bpe_llama, tmp_path, monkeypatch):
    from bitsmith.models import load_any

    lm = load_any(str(tiny_bpe_llama))
    calls = []

    def broken(w, t, name="weight"):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(w, t, name)

    real = gb.encode
    monkeypatch.setattr(gb, "encode", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(lm, "gguf", tmp_path / "x.gguf", type="Q8_0")
    assert list(tmp_path.iterdir()) == []


def _dir_with_tokenizer(src, d):
    """A new model directory `d` holding a copy of `src`'s tokenizer files."""
    d.mkdir()
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            (d / f.name).write_bytes(f.read_bytes())
    return d


def _tiny_qwen2(bpe_dir, tmp_path):
    d = _dir_with_tokenizer(bpe_dir, tmp_path / "tiny-qwen2")
    cfg = transformers.Qwen2Config(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    m = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.5)                   # non-zero q/k/v biases: their names must map too
    m.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_export_reimports_to_the_same_logits(tiny_bpe_llama, tmp_path, own_cache, arch):
    from bitsmith.importers.gguf import load
    from bitsmith.models import load_any

    src = tiny_bpe_llama if arch == "llama" else _tiny_qwen2(tiny_bpe_llama, tmp_path)
    lm = load_any(str(src))
    out = tmp_path / f"{arch}.gguf"
    export(lm, "gguf", out, type="F32")
    ids = torch.tensor([[0, 5, 9, 200, 17, 3, 44, 81]])
    with torch.no_grad():
        torch.testing.assert_close(load(out).model(ids).logits, lm.model(ids).logits, rtol=1e-4, atol=1e-4)


# ---- the real model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_q4_1_gguf_import_export_is_byte_identical(tmp_path):
    from bitsmith.importers.gguf import load
    from bitsmith.models import bundled_path

    src = bundled_path("smollm2-135m")
    lm = load(src)
    assert type(lm.model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    out = tmp_path / "smollm2.gguf"
    s = export(lm, "gguf", out, type="Q4_1")
    assert s["re_encoded"] == 0 and s["lossless"] == 211      # 210 Q4_1 linears + the tied Q8_0 embedding
    a, b = _tensor_bytes(src), _tensor_bytes(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


# ---- llama.cpp (llama-cpp-python: no CPU wheel on PyPI, so CI skips these) ------------------------------
def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (no CPU wheel on PyPI; "
                                                   "pip install 'bitsmith[llamacpp]' compiles llama.cpp)")


def _quantized_copy(lm, method: str, **calib):
    import copy

    from bitsmith.apply import quantize_model
    from bitsmith.models import LoadedModel
    from bitsmith.recipe import Recipe

    model = copy.deepcopy(lm.model)
    quantize_model(model, Recipe(method=method, scheme=gb.gguf_scheme("Q4_0")), **calib)
    return LoadedModel(model, lm.tokenizer, method, "causal-lm", lm.source_dir)


def _ppl(model, windows) -> float:
    from bitsmith.evaluate import score_windows

    return score_windows(model, windows)["ppl"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llamacpp_runs_tiny_exports_like_transformers(tiny_bpe_llama, tmp_path, arch):
    """llama.cpp itself reads the metadata, tensor names, Q/K permutation and biases the way transformers
    computes the model (F32, so only arithmetic order differs)."""
    _llama_cpp()
    from bitsmith.baselines import LlamaCppModel
    from bitsmith.models import load_any

    src = tiny_bpe_llama if arch == "llama" else _tiny_qwen2(tiny_bpe_llama, tmp_path)
    lm = load_any(str(src))
    out = tmp_path / f"{arch}.gguf"
    export(lm, "gguf", out, type="F32")
    ids = torch.tensor([[0, 5, 9, 200, 17, 3, 44, 81]])
    with torch.no_grad():
        ref = lm.model(ids).logits
    got = LlamaCppModel(out, n_ctx=64)(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 * float(ref.abs().max()))


def test_tensor_types_equal_llama_quantize(tiny_bpe_llama, tmp_path):
    """Per-tensor types of bitsmith's K-quant mixes are the ones llama.cpp's own llama_model_quantize picks."""
    import ctypes

    llama_cpp = _llama_cpp()
    from bitsmith.models import load_any

    d = _dir_with_tokenizer(tiny_bpe_llama, tmp_path / "deep")
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=256, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    lm = load_any(str(d))
    export(lm, "gguf", tmp_path / "f32.gguf", type="F32")
    for ftype in ("Q4_K_M", "Q4_K_S"):          # (the Q5_K_M, Q4_0, Q4_1, Q6_K, Q8_0 mixes matched too)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 1
        theirs_path = tmp_path / f"theirs-{ftype}.gguf"
        assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(theirs_path).encode(),
                                              ctypes.byref(params)) == 0
        theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs_path).tensors if len(t.shape) > 1}
        mine = export(lm, "gguf", tmp_path / f"mine-{ftype}.gguf", type=ftype)["tensors"]
        assert {k: r["type"] for k, r in mine.items()} == theirs, ftype


@pytest.mark.slow
def test_llamacpp_perplexity_of_exported_gguf_within_1pct_of_bitsmith(smollm2, eval_text, tmp_path):
    _llama_cpp()
    from bitsmith.baselines import LlamaCppModel
    from bitsmith.evaluate import eval_windows

    lm = _quantized_copy(smollm2, "rtn")
    out = tmp_path / "rtn-q4_0.gguf"
    s = export(lm, "gguf", out)
    assert s["lossless"] == 210 and s["re_encoded"] == 0
    windows = eval_windows(smollm2.tokenizer, eval_text, seq_len=256, max_tokens=1024)
    ours, theirs = _ppl(lm.model, windows), _ppl(LlamaCppModel(out, n_ctx=256), windows)
    assert abs(theirs - ours) / ours < 0.01, (ours, theirs)


@pytest.mark.slow
def test_gptq_exported_losslessly_beats_llamacpp_own_q4_0(smollm2, eval_text, tmp_path):
    _llama_cpp()
    from bitsmith.baselines import LlamaCppModel
    from bitsmith.evaluate import eval_windows
    from bitsmith.models import load_text

    lm = _quantized_copy(smollm2, "gptq", tokenizer=smollm2.tokenizer, calib_text=load_text(None)[0],
                         n_samples=16, seq_len=256)
    ours, ggml = tmp_path / "gptq-q4_0.gguf", tmp_path / "ggml-q4_0.gguf"
    assert export(lm, "gguf", ours, type="Q4_0")["re_encoded"] == 0
    export(smollm2, "gguf", ggml, type="Q4_0")       # ggml's own Q4_0 of the same float weights (bit-exact)
    windows = eval_windows(smollm2.tokenizer, eval_text, seq_len=256, max_tokens=1024)
    assert _ppl(LlamaCppModel(ours, n_ctx=256), windows) < _ppl(LlamaCppModel(ggml, n_ctx=256), windows)
