"""bitsmith.models: loading (bundled, HF dir, GGUF cache, errors), block discovery, text, calibration."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.evaluate import greedy_generate, tokenize_text
from bitsmith.models import (
    BUNDLED,
    bundled_path,
    cache_dir,
    cached_conversion,
    calibration_samples,
    chat_prompt_ids,
    default_text,
    find_decoder_blocks,
    load_any,
    load_model,
    load_text,
    model_from_config,
    split_text,
)

REPO = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """Byte-level stand-in for an HF tokenizer: one token per UTF-8 byte, no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": list(text.encode("utf-8"))}


# ----------------------------------------------------------------------------------- import hygiene


def test_import_does_not_import_transformers():
    code = "import bitsmith.models, sys; assert 'transformers' not in sys.modules, 'transformers imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bundled_names():
    assert set(BUNDLED) >= {"smollm2-135m", "minilm-l6"}
    assert bundled_path("smollm2-135m").suffix == ".gguf"
    assert (bundled_path("minilm-l6") / "config.json").is_file()


# ----------------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_smollm2_is_causal_lm_with_30_blocks(smollm2):
    assert smollm2.kind == "causal-lm" and smollm2.name == "smollm2-135m"
    assert type(smollm2.model).__name__ == "LlamaForCausalLM" and not smollm2.model.training
    assert smollm2.model.config.hidden_size == 576
    name, blocks = find_decoder_blocks(smollm2.model)
    assert name == "model.layers" and len(blocks) == 30
    # the GGUF went through the conversion cache: source_dir is a plain HF dir with tokenizer files
    assert smollm2.source_dir.parent == cache_dir() / "converted"
    assert (smollm2.source_dir / "config.json").is_file()
    assert (smollm2.source_dir / "tokenizer.json").is_file()


@pytest.mark.slow
def test_smollm2_cached_reload_reads_same_dir(smollm2):
    again = load_model("smollm2-135m")
    assert again.source_dir == smollm2.source_dir
    x = torch.randint(0, 1000, (1, 8))
    with torch.inference_mode():
        torch.testing.assert_close(again.model(x).logits, smollm2.model(x).logits)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    ids = chat_prompt_ids(smollm2.tokenizer, "What is the capital of France?")
    assert ids.dtype == torch.long and ids.shape[0] == 1
    answer = greedy_generate(smollm2.model, smollm2.tokenizer, ids, max_new_tokens=20)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_minilm_loads_as_encoder(minilm):
    assert minilm.kind == "encoder" and type(minilm.model).__name__ == "BertModel"
    assert not minilm.model.training
    name, blocks = find_decoder_blocks(minilm.model)
    assert name == "encoder.layer" and len(blocks) == 6
    assert minilm.source_dir == bundled_path("minilm-l6")


# ----------------------------------------------------------------------------------- load errors


def test_missing_path_raises(tmp_path):
    with pytest.raises(BitsmithError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(BitsmithError, match="not a model directory"):
        load_model(str(tmp_path))


def test_non_gguf_file_raises(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(BitsmithError, match="not a .gguf"):
        load_model(str(f))


def test_truncated_safetensors_names_the_file(tmp_path):
    model_dir = tmp_path / "minilm"
    shutil.copytree(bundled_path("minilm-l6"), model_dir)
    weights = model_dir / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(BitsmithError, match="model.safetensors"):
        load_model(str(model_dir))


def test_garbage_safetensors_header_names_the_file(tmp_path):
    model_dir = tmp_path / "minilm"
    model_dir.mkdir()
    shutil.copy(bundled_path("minilm-l6") / "config.json", model_dir)
    (model_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(BitsmithError, match="model.safetensors.*corrupt or truncated"):
        load_model(str(model_dir))


def test_unknown_hub_id_offline_raises():
    # conftest sets HF_HUB_OFFLINE=1, so this fails fast instead of retrying the network
    with pytest.raises(BitsmithError, match="could not be found"):
        load_model("no-such-org/no-such-model")


# ----------------------------------------------------------------------------------- checkpoints


def test_load_any_delegates_to_load_model(tmp_path):
    with pytest.raises(BitsmithError, match="does not exist"):
        load_any(str(tmp_path / "nope"))


@pytest.mark.slow
def test_model_from_config_builds_the_same_skeleton(minilm, tmp_path):
    config = json.loads((minilm.source_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsmith"}  # as a saved checkpoint has it
    (tmp_path / "config.json").write_text(json.dumps(config))
    skeleton = model_from_config(tmp_path)
    assert type(skeleton) is type(minilm.model) and not skeleton.training
    assert sorted(skeleton.state_dict()) == sorted(minilm.model.state_dict())


@pytest.mark.slow
def test_load_any_reads_a_quantized_checkpoint(tmp_path):
    import bitsmith
    from bitsmith import checkpoint

    lm = load_model("minilm-l6")
    bitsmith.quantize(lm.model, "w4-g64")
    checkpoint.save(lm.model, tmp_path / "q", tokenizer=lm.tokenizer, source_dir=lm.source_dir)
    again = load_any(str(tmp_path / "q"))
    assert again.kind == "encoder" and again.source_dir == tmp_path / "q"
    x = lm.tokenizer("quantized checkpoints load back", return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(again.model(**x).last_hidden_state, lm.model(**x).last_hidden_state)


# ----------------------------------------------------------------------------------- GGUF cache


def test_cached_conversion_converts_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    calls = []

    def convert(path: Path, out: Path) -> None:
        calls.append(path)
        (out / "config.json").write_text("{}")

    first = cached_conversion(src, convert)
    second = cached_conversion(src, convert)
    assert first == second and len(calls) == 1
    assert (first / "config.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dir left behind


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")

    def convert(path: Path, out: Path) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_conversion(src, convert)
    assert list((tmp_path / "cache" / "converted").iterdir()) == []


# ----------------------------------------------------------------------------------- find_decoder_blocks


class Block(nn.Module):
    def __init__(self, n_experts: int = 0):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(n_experts))


class Toy(nn.Module):
    def __init__(self, n_blocks: int, n_experts: int = 0):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(n_blocks + 5))  # long, but no linears
        self.mixed = nn.ModuleList([nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8))] * 10)  # not homogeneous
        self.body = nn.Module()
        self.body.layers = nn.ModuleList(Block(n_experts) for _ in range(n_blocks))


def test_find_decoder_blocks_generic():
    name, blocks = find_decoder_blocks(Toy(3))
    assert name == "body.layers" and len(blocks) == 3


def test_find_decoder_blocks_ignores_longer_nested_expert_lists():
    name, blocks = find_decoder_blocks(Toy(2, n_experts=16))
    assert name == "body.layers" and len(blocks) == 2


def test_find_decoder_blocks_none():
    assert find_decoder_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) is None


# ----------------------------------------------------------------------------------- text


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p]


def test_split_text_every_eighth_paragraph():
    text = "\n\n".join(f"para {i}" for i in range(40))
    calib, held = split_text(text)
    assert _paragraphs(held) == [f"para {i}" for i in range(7, 40, 8)]
    assert _paragraphs(calib) == [f"para {i}" for i in range(40) if i % 8 != 7]
    assert split_text(text) == (calib, held)


def test_split_default_text_deterministic_and_disjoint():
    text = default_text()
    assert text == default_text() and len(text) > 100_000
    calib, held = split_text(text)
    assert (calib, held) == split_text(text) == load_text(None)
    # each paragraph (by position) lands in exactly one part: together they rebuild the text
    units = [u.strip() for u in re.split(r"\n[ \t]*\n", text.strip()) if u.strip()]
    assert held == "\n\n".join(u for i, u in enumerate(units) if i % 8 == 7)
    assert calib == "\n\n".join(u for i, u in enumerate(units) if i % 8 != 7)
    assert len(held) > 40_000


def test_split_text_falls_back_to_lines_and_rejects_tiny_text():
    calib, held = split_text("\n".join(f"line {i}" for i in range(16)))
    assert held == "line 7\nline 15"
    with pytest.raises(BitsmithError, match="too short"):
        split_text("one line only")
    with pytest.raises(BitsmithError, match="eval_fraction"):
        split_text("a\nb", eval_fraction=1.5)


def test_load_text_file_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"p{i}" for i in range(16)), encoding="utf-8")
    assert load_text(str(f)) == split_text(f.read_text())
    with pytest.raises(BitsmithError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n\nau lait".encode("latin-1"))
    with pytest.raises(BitsmithError, match="not UTF-8"):
        load_text(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(BitsmithError, match="empty"):
        load_text(str(empty))


@pytest.mark.slow
def test_default_eval_text_has_enough_tokens(smollm2, eval_text):
    assert tokenize_text(smollm2.tokenizer, eval_text, None).numel() >= 4096


# ----------------------------------------------------------------------------------- calibration data


def test_calibration_samples_shape_and_determinism():
    tok = CharTokenizer()
    text = "".join(chr(97 + i % 26) for i in range(3000))
    stream = torch.tensor(list(text.encode()))
    a = calibration_samples(tok, text, n_samples=16, seq_len=64, seed=0)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_samples(tok, text, n_samples=16, seq_len=64, seed=0))
    assert not torch.equal(a, calibration_samples(tok, text, n_samples=16, seq_len=64, seed=1))
    for row in a:  # every sample is a contiguous window of the token stream
        start = (row[0] - 97).item()  # the alphabet repeats, so the first letter fixes the phase
        assert any(torch.equal(row, stream[s : s + 64]) for s in range(start, 3000 - 64, 26))


def test_calibration_samples_too_short_raises():
    with pytest.raises(BitsmithError, match="has 10 tokens"):
        calibration_samples(CharTokenizer(), "0123456789", n_samples=2, seq_len=10)


@pytest.mark.slow
def test_calibration_samples_real_tokenizer(smollm2):
    calib, _ = load_text(None)
    x = calibration_samples(smollm2.tokenizer, calib[:50_000], n_samples=4, seq_len=128, seed=3)
    assert x.shape == (4, 128) and int(x.max()) < smollm2.model.config.vocab_size


def test_chat_prompt_ids_without_template():
    ids = chat_prompt_ids(CharTokenizer(), "hi")
    assert ids.tolist() == [[104, 105]]
