"""bitsmith.evaluate: perplexity against an independent NLL computation, window accounting, generation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.evaluate import greedy_generate, logits, perplexity, tokenize_text

VOCAB = 64


class CharTokenizer:
    """One token per character (code point mod VOCAB); decode maps back into printable ASCII."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(33 + i % 90) for i in ids)


class TinyLM(nn.Module):
    """Causal by construction: position t sees the running mean of embeddings 0..t."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 16)
        self.drop = nn.Dropout(0.5)  # must be off during evaluation
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids):  # (B, T) -> object with .logits (B, T, V)
        h = self.emb(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return SimpleNamespace(logits=self.head(self.drop(h)) * 3)


TEXT = "".join(chr(40 + (i * 7 + i // 13) % 60) for i in range(1000))


def reference_nll(model: nn.Module, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Mean NLL the slow way: one prediction at a time, float64 log-softmax."""
    total, count = 0.0, 0
    for w in range(ids.numel() // seq_len):
        window = ids[w * seq_len : (w + 1) * seq_len]
        for t in range(1, seq_len):
            lg = model.eval()(window[:t].unsqueeze(0)).logits[0, -1].double()
            total -= torch.log_softmax(lg, -1)[window[t]].item()
            count += 1
    return total / count, count


def test_perplexity_matches_independent_nll():
    model, tok = TinyLM(), CharTokenizer()
    out = perplexity(model, tok, TEXT, seq_len=50, max_tokens=230)
    ids = tokenize_text(tok, TEXT, 230)
    nll, count = reference_nll(model, ids, 50)
    assert out["windows"] == 4 and out["tokens"] == count == 4 * 49
    assert out["nll"] == pytest.approx(nll, rel=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_perplexity_window_accounting():
    out = perplexity(TinyLM(), CharTokenizer(), TEXT, seq_len=100, max_tokens=450)
    assert (out["windows"], out["tokens"]) == (4, 4 * 99)  # the 50-token tail is dropped
    out = perplexity(TinyLM(), CharTokenizer(), TEXT, seq_len=100, max_tokens=10_000)
    assert (out["windows"], out["tokens"]) == (10, 10 * 99)  # text has exactly 1000 tokens


def test_perplexity_deterministic_and_restores_training_mode():
    model = TinyLM().train()
    a = perplexity(model, CharTokenizer(), TEXT, seq_len=64, max_tokens=512, progress=True)
    b = perplexity(model, CharTokenizer(), TEXT, seq_len=64, max_tokens=512)
    assert a == b and model.training


def test_perplexity_too_short_text_raises():
    with pytest.raises(BitsmithError, match="text has 30 tokens, fewer than one window of 64"):
        perplexity(TinyLM(), CharTokenizer(), TEXT[:30], seq_len=64, max_tokens=512)
    with pytest.raises(BitsmithError, match="max_tokens 32 is smaller than seq_len 64"):
        perplexity(TinyLM(), CharTokenizer(), TEXT, seq_len=64, max_tokens=32)
    with pytest.raises(BitsmithError, match="seq_len must be at least 2"):
        perplexity(TinyLM(), CharTokenizer(), TEXT, seq_len=1)


def test_tokenize_text_truncates():
    ids = tokenize_text(CharTokenizer(), "abcdef", 4)
    assert ids.dtype == torch.long and ids.tolist() == [ord(c) % VOCAB for c in "abcd"]
    assert tokenize_text(CharTokenizer(), "abcdef", None).numel() == 6


def test_logits_accepts_object_tuple_and_tensor():
    x = torch.randn(1, 3, 5)
    for out in (SimpleNamespace(logits=x), (x, None), x):
        assert logits(lambda ids, out=out: out, torch.zeros(1, 3, dtype=torch.long)) is x


def test_greedy_generate_manual_loop_is_argmax():
    model, tok = TinyLM().eval(), CharTokenizer()
    prompt = torch.tensor([[1, 2, 3]])
    ids = prompt
    for _ in range(5):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy_generate(model, tok, prompt, max_new_tokens=5) == tok.decode(ids[0, 3:].tolist())


def test_greedy_generate_uses_generate_when_present():
    class WithGenerate(TinyLM):
        def generate(self, ids, max_new_tokens, do_sample, **kwargs):
            assert do_sample is False
            return torch.cat([ids, torch.full((1, max_new_tokens), 7)], 1)

    text = greedy_generate(WithGenerate(), CharTokenizer(), torch.tensor([[1, 2]]), 3)
    assert text == CharTokenizer().decode([7] * 3)


@pytest.mark.slow
def test_smollm2_fp32_perplexity_on_held_out_text(smollm2, eval_text):
    out = perplexity(smollm2.model, smollm2.tokenizer, eval_text, seq_len=1024, max_tokens=4096)
    print(f"\nSmolLM2-135M FP32 perplexity (held-out pydoc text, seq_len 1024, 4096 tokens): {out}")
    assert out["windows"] == 4 and out["tokens"] == 4 * 1023
    assert math.isfinite(out["ppl"]) and 2 < out["ppl"] < 60
