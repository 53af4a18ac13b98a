"""What a quantization cost: perplexity and greedy generation (pure torch + the tokenizer passed in).

Perplexity follows the usual non-overlapping-window protocol (as in GPTQ's and llama.cpp's evaluations):
the first `max_tokens` tokens of the text are cut into full windows of `seq_len`; each window is scored
on its own (logits at 0..L-2 predict tokens 1..L-1), NLLs are summed in float64 and
ppl = exp(sum NLL / predicted tokens). Text is tokenized without special tokens, so calibration and
evaluation see the same plain token stream whatever BOS/CLS conventions a tokenizer has.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.errors import BitsmithError

log = logging.getLogger(__name__)


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None) -> torch.Tensor:
    """The first max_tokens token ids of text (all when None), without added special tokens. (T,)"""
    # verbose=False: HF tokenizers warn when a long text exceeds model_max_length; we window it ourselves
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)  # (T,)
    return ids if max_tokens is None else ids[:max_tokens]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameterless module)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a model that returns an object with .logits, a tuple, or a tensor."""
    out = model(ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def perplexity(model: nn.Module, tokenizer: Any, text: str, *, seq_len: int = 1024, max_tokens: int = 4096,
               progress: bool = False, device: str | torch.device | None = None) -> dict[str, float | int]:
    """Perplexity over full non-overlapping windows: {"ppl", "nll" (mean per token), "tokens", "windows"}."""
    if seq_len < 2:
        raise BitsmithError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
    if max_tokens < seq_len:
        raise BitsmithError(f"max_tokens {max_tokens} is smaller than seq_len {seq_len}; raise --max-tokens")
    ids = tokenize_text(tokenizer, text, max_tokens)  # (T,)
    n_windows = ids.numel() // seq_len  # a partial last window would be scored on less context: drop it
    if n_windows == 0:
        raise BitsmithError(
            f"text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "use a longer --text or a smaller --seq-len"
        )
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)  # (W, L)
    device = torch.device(device) if device is not None else model_device(model)
    rows = windows
    if progress:
        from tqdm import tqdm

        rows = tqdm(windows, desc="perplexity", unit="window")
    total = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()  # dropout would make the number noisy and wrong
    try:
        with torch.inference_mode():
            for window in rows:
                x = window.unsqueeze(0).to(device)  # (1, L)
                lg = logits(model, x)[0, :-1].float()  # (L-1, V)
                nll = F.cross_entropy(lg, x[0, 1:], reduction="none")  # (L-1,)
                total += nll.double().sum().cpu()
    finally:
        model.train(was_training)
    tokens = n_windows * (seq_len - 1)
    mean = total.item() / tokens
    log.debug("perplexity over %d windows of %d: nll %.4f", n_windows, seq_len, mean)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": tokens, "windows": n_windows}


def greedy_generate(model: nn.Module, tokenizer: Any, prompt_ids: torch.Tensor,
                    max_new_tokens: int = 20) -> str:
    """Greedy continuation of prompt_ids (1, T), decoded without special tokens (new text only)."""
    device = model_device(model)
    ids = prompt_ids.to(device)  # (1, T)
    with torch.inference_mode():
        if hasattr(model, "generate"):
            pad = getattr(tokenizer, "pad_token_id", None)
            pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        else:
            out = _argmax_loop(model, ids, max_new_tokens, getattr(tokenizer, "eos_token_id", None))
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def _argmax_loop(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> torch.Tensor:
    # No KV cache: this fallback is for small test models and models without .generate.
    for _ in range(max_new_tokens):
        nxt = logits(model, ids)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, nxt], dim=1)
        if eos is not None and nxt.item() == eos:
            break
    return ids
