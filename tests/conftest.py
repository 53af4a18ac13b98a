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
