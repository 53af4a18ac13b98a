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


# ---- KL, agreement, latency, memory, embeddings (issue 4) ---------------------------------------------
from bitsmith.evaluate import (  # noqa: E402
    PeakMemory, embedding_scores, eval_windows, kl_divergence, kl_to_reference, latency, reference_logprobs,
    retrieval_pairs, score_windows,
)


def test_kl_of_a_model_to_itself_is_zero():
    model, tok = TinyLM(), CharTokenizer()
    windows = eval_windows(tok, TEXT, seq_len=50, max_tokens=230)
    out = score_windows(model, windows, reference_logprobs(model, windows))
    assert out["kl"] == 0.0 and out["kl_p99"] == 0.0 and out["top1"] == 1.0
    lazy = kl_to_reference(model, model, tok, TEXT, seq_len=50, max_tokens=230)
    assert lazy["kl"] == 0.0 and lazy["top1"] == 1.0
    assert out["ppl"] == pytest.approx(perplexity(model, tok, TEXT, seq_len=50, max_tokens=230)["ppl"], rel=1e-9)


def test_kl_and_agreement_match_an_independent_computation():
    ref, other, tok = TinyLM(0).eval(), TinyLM(1).eval(), CharTokenizer()
    windows = eval_windows(tok, TEXT, seq_len=40, max_tokens=120)
    out = kl_to_reference(other, ref, tok, TEXT, seq_len=40, max_tokens=120)
    kls, agree = [], 0
    for w in windows:
        p = torch.softmax(ref(w[None]).logits[0, :-1].double(), -1)
        q = torch.softmax(other(w[None]).logits[0, :-1].double(), -1)
        kls += (p * (p.log() - q.log())).sum(-1).tolist()
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
    assert out["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-5) and out["kl"] > 0.01
    assert out["top1"] == agree / len(kls) < 1


def test_kl_divergence_is_safe_where_the_reference_probability_is_zero():
    ref = torch.log(torch.tensor([[1.0, 0.0, 0.0]]))   # (1, 3) with -inf entries
    q = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    assert kl_divergence(ref, q).item() == pytest.approx(-q[0, 0].item())


def test_reference_logprobs_fall_back_to_float16_over_the_budget():
    model, tok = TinyLM(), CharTokenizer()
    windows = eval_windows(tok, TEXT, seq_len=50, max_tokens=100)
    assert reference_logprobs(model, windows)[0].dtype == torch.float32
    small = reference_logprobs(model, windows, max_bytes=1000)
    assert small[0].dtype == torch.float16 and small[0].shape == (49, VOCAB)


def test_latency_without_kv_cache():
    res = latency(TinyLM(), torch.arange(20).reshape(1, 20), new_tokens=3, repeats=1)
    assert res["prefill_tokens_per_s"] > 0 and res["decode_tokens_per_s"] > 0 and res["kv_cache"] is False
    assert latency(TinyLM(), torch.arange(5)[None], new_tokens=0)["decode_tokens_per_s"] is None


def test_peak_memory_sees_torch_allocations():
    """The sampler must see the RSS reached while a 256 MB tensor is alive. (RSS need not grow by 256 MB: the
    allocator may reuse pages freed by earlier tests, so compare against RSS read at that moment.)"""
    import time

    from bitsmith.evaluate import rss_bytes

    with PeakMemory(interval=0.005) as mem:
        x = torch.ones(64 * 2**20)  # 256 MB, touched so it is resident
        assert x.sum().item() > 0
        inside = rss_bytes()
        time.sleep(0.05)
        del x
    res = mem.result()
    if inside is None:
        pytest.skip("RSS cannot be read on this platform")
    assert res["peak_bytes"] >= inside - (1 << 20) and res["peak_bytes"] >= res["delta_bytes"] >= 0


def test_embedding_scores_and_retrieval_pairs():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    d = torch.nn.functional.normalize(q + 0.01 * torch.randn(6, 8), dim=-1)
    same = embedding_scores(q, d, q, d)
    assert same["cosine"] == pytest.approx(1.0) and same["retrieval_agreement"] == 1.0
    assert same["retrieval_top1"] == 1.0
    flipped = embedding_scores(q, d.flip(0), q, d)
    assert flipped["retrieval_agreement"] < 1.0
    text = "\n\n".join(f"Title {i}\n" + "body words " * 12 for i in range(5))
    queries, docs = retrieval_pairs(text)
    assert queries[0] == "Title 0" and len(docs) == 5 and docs[0].startswith("body")
    with pytest.raises(BitsmithError, match="fewer than 2 paragraphs"):
        retrieval_pairs("one line only")


@pytest.mark.slow
def test_minilm_embeddings_survive_int8(minilm, eval_text):
    import copy

    import bitsmith
    from bitsmith import Recipe, Scheme
    from bitsmith.evaluate import embed

    queries, docs = retrieval_pairs(eval_text, n=16)
    ref_q, ref_d = embed(minilm.model, minilm.tokenizer, queries), embed(minilm.model, minilm.tokenizer, docs)
    m = copy.deepcopy(minilm.model)
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=8, group_size=None)))
    res = embedding_scores(embed(m, minilm.tokenizer, queries), embed(m, minilm.tokenizer, docs), ref_q, ref_d)
    print(f"\nMiniLM int8 vs fp32 on {len(queries)} query/doc pairs: {res}")
    assert res["cosine"] > 0.995 and res["retrieval_agreement"] >= 0.9


def test_wikitext2_text_rebuilds_the_gptq_join(tmp_path):
    from bitsmith.evaluate import wikitext2_text

    raw = tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    raw.parent.mkdir()
    raw.write_text(" \n = Title = \n \n First line .\n Second line .\n", encoding="utf-8")
    # HF rows: "", " = Title = \n", "", " First line .\n", " Second line .\n"; GPTQ joins them with "\n\n"
    want = "\n\n = Title = \n\n\n\n\n First line .\n\n\n Second line .\n"
    assert wikitext2_text(raw) == want and wikitext2_text(tmp_path) == want   # the file or a folder holding it
    (tmp_path / "empty").mkdir()
    with pytest.raises(BitsmithError, match="no wiki.test.raw under"):
        wikitext2_text(tmp_path / "empty")
    with pytest.raises(BitsmithError, match="does not exist"):
        wikitext2_text(tmp_path / "missing.raw")


def test_accuracy_and_agreement():
    from bitsmith.evaluate import accuracy

    torch.manual_seed(0)
    x = torch.randn(300, 5)
    labels = x.argmax(-1)
    exact = nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        exact.weight.copy_(torch.eye(5))
    noisy = nn.Linear(5, 5, bias=False)
    with torch.no_grad():
        noisy.weight.copy_(torch.eye(5) + 0.5 * torch.randn(5, 5))
    assert accuracy(exact, x, labels, batch_size=64) == {"accuracy": 1.0, "samples": 300}
    res = accuracy(noisy, x, labels, reference=exact)
    pred = (x @ noisy.weight.T).argmax(-1)
    assert res["accuracy"] == res["agreement"] == (pred == labels).float().mean().item() < 1
    with pytest.raises(BitsmithError, match="as many labels as inputs"):
        accuracy(exact, x, labels[:10])


def test_dense_weights_generate_the_same_text_and_restore_the_modules(tiny_llama):
    from bitsmith import Recipe, Scheme, quantize
    from bitsmith.evaluate import dense_weights, generate_texts
    from bitsmith.kernels import set_policy
    from bitsmith.models import load_model
    from bitsmith.nn import QuantLinear

    lm = load_model(str(tiny_llama))
    quantize(lm.model, Recipe(scheme=Scheme(bits=3, group_size=32)))
    prompts = [lm.tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]]
    before = {n: type(m) for n, m in lm.model.named_modules()}
    set_policy("reference")
    try:
        want = generate_texts(lm.model, lm.tokenizer, prompts, 8)
        with dense_weights(lm.model) as m:
            assert not any(type(x) is QuantLinear for x in m.modules())
            got = generate_texts(m, lm.tokenizer, prompts, 8)
    finally:
        set_policy(None)
    assert got == want
    assert {n: type(m) for n, m in lm.model.named_modules()} == before
