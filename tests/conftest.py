"""Session-wide fixtures: each real model is loaded (and the GGUF converted) once per test session.

Tests that use `smollm2`, `minilm` or a real tokenizer are marked `@pytest.mark.slow`; run the fast
suite with `pytest -m "not slow"`. The GGUF conversion is cached under $BITSMITH_CACHE (default
~/.cache/bitsmith), so only the very first session pays its ~30 s.
"""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub: set before huggingface_hub is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    from bitsmith.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    from bitsmith.models import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="session")
def eval_text() -> str:
    """The held-out part of the default text (pydoc topics)."""
    from bitsmith.models import load_text

    return load_text(None)[1]


TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-block Llama with random weights and MiniLM's tokenizer: real transformers code, seconds to run."""
    import shutil

    import torch

    transformers = pytest.importorskip("transformers")
    from bitsmith.models import bundled_path

    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    src = bundled_path("minilm-l6")
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, d / name)
    return d
