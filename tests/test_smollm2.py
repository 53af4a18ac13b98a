"""Issue 2 acceptance on the real SmolLM2-135M (held-out default text, seq-len 1024, 4096 tokens)."""

import copy
import os

import pytest
import torch

import bitsmith
from bitsmith import Recipe, Scheme
from bitsmith.evaluate import greedy_generate, logits, perplexity
from bitsmith.models import chat_prompt_ids
from bitsmith.size import file_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32_ppl(smollm2, eval_text):
    return perplexity(smollm2.model, smollm2.tokenizer, eval_text, seq_len=1024, max_tokens=4096)["ppl"]


@pytest.fixture(scope="module")
def int8(smollm2):
    m = copy.deepcopy(smollm2.model)
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=8, group_size=None)))
    return m


def test_int8_per_channel_perplexity_within_half_percent(smollm2, int8, eval_text, fp32_ppl):
    q = perplexity(int8, smollm2.tokenizer, eval_text, seq_len=1024, max_tokens=4096)["ppl"]
    print(f"fp32 ppl {fp32_ppl:.4f}, rtn int8 ppl {q:.4f}")
    assert abs(q - fp32_ppl) / fp32_ppl <= 0.005


def test_int8_still_knows_paris(smollm2, int8):
    ids = chat_prompt_ids(smollm2.tokenizer, "What is the capital of France?")
    answer = greedy_generate(int8, smollm2.tokenizer, ids, max_new_tokens=12)
    assert "Paris" in answer, answer


def test_int4_g64_file_is_at_most_a_quarter_of_fp32(smollm2, tmp_path):
    fp32_bytes = file_bytes(smollm2.source_dir)          # the fp32 safetensors checkpoint
    m = copy.deepcopy(smollm2.model)
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=4, group_size=64)))
    out = bitsmith.save(m, tmp_path / "w4", tokenizer=smollm2.tokenizer)
    q_bytes = file_bytes(out)
    print(f"fp32 file {fp32_bytes:,} B, int4 g64 file {q_bytes:,} B ({100 * q_bytes / fp32_bytes:.1f}%)")
    assert q_bytes <= 0.25 * fp32_bytes
    assert q_bytes == os.path.getsize(out / "model.safetensors")
    # and it reloads (through the public loader, tokenizer included) with identical logits
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    loaded = bitsmith.load_model(str(out))
    assert loaded.kind == "causal-lm"
    assert torch.equal(logits(m, ids), logits(loaded.model, ids))
    assert loaded.tokenizer("Paris")["input_ids"] == smollm2.tokenizer("Paris")["input_ids"]
