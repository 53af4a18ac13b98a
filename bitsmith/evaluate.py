"""What a quantization cost: perplexity, KL to the reference, top-1 agreement, generation, embedding
similarity, latency and memory (pure torch + the tokenizer passed in).

Perplexity follows the usual non-overlapping-window protocol (as in GPTQ's and llama.cpp's evaluations):
the first `max_tokens` tokens of the text are cut into full windows of `seq_len`; each window is scored
on its own (logits at 0..L-2 predict tokens 1..L-1), NLLs are summed in float64 and
ppl = exp(sum NLL / predicted tokens). Text is tokenized without special tokens, so calibration and
evaluation see the same plain token stream whatever BOS/CLS conventions a tokenizer has.
KL(reference || model) of the next-token distribution and top-1 agreement (argmax equal) are averaged
over exactly the same predicted positions (llama.cpp's `--kl-divergence` protocol).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.progress import bar as progress_bar

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


def eval_windows(tokenizer: Any, text: str, *, seq_len: int = 1024, max_tokens: int | None = 4096) -> torch.Tensor:
    """The full non-overlapping windows of the first max_tokens tokens of text (all when None). (W, L)"""
    if seq_len < 2:
        raise BitsmithError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise BitsmithError(f"max_tokens {max_tokens} is smaller than seq_len {seq_len}; raise --max-tokens")
    ids = tokenize_text(tokenizer, text, max_tokens)  # (T,)
    n_windows = ids.numel() // seq_len  # a partial last window would be scored on less context: drop it
    if n_windows == 0:
        raise BitsmithError(
            f"text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "use a longer --text or a smaller --seq-len"
        )
    return ids[: n_windows * seq_len].view(n_windows, seq_len)  # (W, L)


def perplexity(model: nn.Module, tokenizer: Any, text: str, *, seq_len: int = 1024, max_tokens: int | None = 4096,
               progress: bool = False, device: str | torch.device | None = None) -> dict[str, float | int]:
    """Perplexity over full non-overlapping windows: {"ppl", "nll" (mean per token), "tokens", "windows"}."""
    windows = eval_windows(tokenizer, text, seq_len=seq_len, max_tokens=max_tokens)
    return score_windows(model, windows, progress=progress, device=device)


# GPTQ's WikiText-2 protocol (IST-DASLab/gptq datautils): the test split's rows joined by blank lines,
# tokenized as one stream, every full window of 2048 tokens scored (no token cap).
WIKITEXT2_SEQ_LEN = 2048


def wikitext2_text(path: str | Path) -> str:
    """The WikiText-2 test text as GPTQ's evaluation builds it, from the user's own copy: `wiki.test.raw`
    (the raw file, one dataset row per line) or a directory holding it. Nothing is downloaded."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.rglob("wiki.test.raw"))
        if not found:
            raise BitsmithError(f"no wiki.test.raw under {p}; pass the WikiText-2 (raw) test file")
        p = found[0]
    if not p.is_file():
        raise BitsmithError(f"WikiText-2 file {p} does not exist; pass the path of wiki.test.raw")
    # the HF dataset's rows: each line with its newline, whitespace-only lines as ""; GPTQ joins them by "\n\n"
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    return "\n\n".join(line if line.strip() else "" for line in lines)


def window_logprobs(model: nn.Module | Callable, window: torch.Tensor,
                    device: str | torch.device | None = None) -> torch.Tensor:
    """float32 log-softmax of the next-token logits at positions 0..L-2 of one window (L,). (L-1, V)"""
    device = torch.device(device) if device is not None else _device_of(model)
    x = window.reshape(1, -1).to(device)  # (1, L)
    return torch.log_softmax(logits(model, x)[0, :-1].float(), dim=-1).cpu()  # (L-1, V)


def reference_logprobs(model: nn.Module | Callable, windows: torch.Tensor, *, progress: bool = False,
                       max_bytes: int = 2 << 30) -> list[torch.Tensor]:
    """The reference model's log-probabilities of every window, kept for KL against many models.

    float32 while W*(L-1)*V*4 bytes fit in max_bytes (4 windows of 1024 x 49152 vocab: 0.8 GB), else
    float16 (the error lands on tokens whose probability is negligible, as in llama.cpp's 16-bit store)."""
    w, length = windows.shape
    out: list[torch.Tensor] = []
    half = False
    with _eval_mode(model), _no_grad():
        for window in progress_bar(windows, progress, "reference", "window"):
            lp = window_logprobs(model, window)  # (L-1, V)
            if not out and w * (length - 1) * lp.shape[-1] * 4 > max_bytes:
                half = True
                log.info("reference log-probs kept in float16 to stay under %d bytes", max_bytes)
            out.append(lp.half() if half else lp)
    return out


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || model) per position, in nats, from log-probabilities (..., V). (...)"""
    ref = ref_logprobs.float()
    # p * (log p - log q), with 0 * log 0 = 0 where the reference probability underflows
    return torch.where(ref.isneginf(), 0.0, ref.exp() * (ref - logprobs.float())).sum(-1)


def score_windows(model: nn.Module | Callable, windows: torch.Tensor, ref: Iterable[torch.Tensor] | None = None, *,
                  progress: bool = False, device: str | torch.device | None = None) -> dict[str, float | int]:
    """Perplexity of `model` over windows (W, L); with `ref` (one (L-1, V) log-prob tensor per window, a
    list or a lazy generator) also the mean KL(ref || model), its 99th percentile and top-1 agreement.

    `model` is an nn.Module or any callable ids (1, L) -> logits (1, L, V), such as an external runtime."""
    n_windows, seq_len = windows.shape
    total = torch.zeros((), dtype=torch.float64)
    kls, agree = [], 0
    refs = iter(ref) if ref is not None else None
    with _eval_mode(model), _no_grad():
        for window in progress_bar(windows, progress, "evaluate", "window"):
            lp = window_logprobs(model, window, device)  # (L-1, V)
            target = window[1:].reshape(-1, 1)  # (L-1, 1)
            total -= lp.gather(-1, target).double().sum()
            if refs is not None:
                r = next(refs)  # (L-1, V)
                kls.append(kl_divergence(r, lp).double())
                agree += int((r.argmax(-1) == lp.argmax(-1)).sum())
    tokens = n_windows * (seq_len - 1)
    mean = total.item() / tokens
    log.debug("scored %d windows of %d: nll %.4f", n_windows, seq_len, mean)
    out: dict[str, float | int] = {"ppl": math.exp(mean), "nll": mean, "tokens": tokens, "windows": n_windows}
    if refs is not None:
        kl = torch.cat(kls)  # (W*(L-1),)
        out.update({"kl": kl.mean().item(), "kl_p99": torch.quantile(kl.float(), 0.99).item(),
                    "top1": agree / tokens})
    return out


def kl_to_reference(model: nn.Module, ref_model: nn.Module, tokenizer: Any, text: str, *, seq_len: int = 1024,
                    max_tokens: int = 4096, progress: bool = False) -> dict[str, float | int]:
    """score_windows of model against ref_model, computing each reference window just in time (no store)."""
    windows = eval_windows(tokenizer, text, seq_len=seq_len, max_tokens=max_tokens)

    def lazy_ref() -> Iterator[torch.Tensor]:
        # The grad mode is thread-local: a context held open across `yield` would leak inference mode into
        # the caller (and forever, if the generator is not exhausted). Enter it per window instead.
        for window in windows:
            with _eval_mode(ref_model), _no_grad():
                lp = window_logprobs(ref_model, window)
            yield lp

    return score_windows(model, windows, lazy_ref(), progress=progress)


def greedy_generate(model: nn.Module, tokenizer: Any, prompt_ids: torch.Tensor,
                    max_new_tokens: int = 20) -> str:
    """Greedy continuation of prompt_ids (1, T), decoded without special tokens (new text only). `model` may
    also be a logits callable (an external runtime such as the llama.cpp baseline)."""
    device = _device_of(model)
    ids = prompt_ids.to(device)  # (1, T)
    with _no_grad():
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


@contextlib.contextmanager
def dense_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Every plain QuantLinear swapped for an nn.Linear holding its dequantized weight, swapped back on exit.

    The same numbers as the reference forward (dequantize, then F.linear, in the model's float dtype), without
    dequantizing every weight again at every generated token: the side-by-side generations of `compare` are
    about what the model says, and at 3 bits (no CPU kernel) the reference path decodes at < 1 token/s.
    Speed is measured elsewhere, on the real modules. Classes with run-time transforms stay as they are."""
    from bitsmith.nn import QuantLinear
    from bitsmith.select import set_submodule

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name, m in list(model.named_modules()):
            if type(m) is not QuantLinear:
                continue
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            dense.weight = nn.Parameter(m.dequantize(dtype), requires_grad=False)
            if m.bias is not None:
                dense.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
            set_submodule(model, name, dense)
            swapped.append((name, m))
        yield model
    finally:
        for name, m in swapped:
            set_submodule(model, name, m)


def generate_texts(model: nn.Module, tokenizer: Any, prompts: list[torch.Tensor],
                   max_new_tokens: int = 24) -> list[str]:
    """greedy_generate for each prompt (1, T): the side-by-side column of one configuration."""
    with _eval_mode(model):
        return [greedy_generate(model, tokenizer, ids, max_new_tokens) for ids in prompts]


# ---- latency and memory ------------------------------------------------------------------------------
def latency(model: nn.Module, prompt: torch.Tensor, *, new_tokens: int = 16,
            repeats: int = 2) -> dict[str, float | bool]:
    """Batch-1 speed: prefill tokens/s over `prompt` (1, T) and decode tokens/s of `new_tokens` greedy
    steps. Best of `repeats` runs (the first also warms up). Decode uses the model's KV cache when its
    output has `past_key_values`; otherwise every step reruns the whole sequence, flagged `kv_cache` False."""
    best_prefill, best_decode, cached = math.inf, math.inf, False
    ids = prompt.reshape(1, -1).to(_device_of(model))
    with _eval_mode(model), _no_grad():
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            out = _call(model, ids, use_cache=True)
            best_prefill = min(best_prefill, time.perf_counter() - t0)
            past = getattr(out, "past_key_values", None)
            cached = past is not None
            if new_tokens == 0:      # an encoder: there is nothing to decode
                continue
            nxt = _last_logits(out).argmax(-1, keepdim=True)  # (1, 1)
            seq = torch.cat([ids, nxt], 1)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                if cached:
                    out = _call(model, nxt, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                else:
                    out = _call(model, seq)
                nxt = _last_logits(out).argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
            best_decode = min(best_decode, time.perf_counter() - t0)
    decode = new_tokens / best_decode if new_tokens > 0 else None
    return {"prefill_tokens_per_s": ids.shape[1] / best_prefill, "decode_tokens_per_s": decode,
            "prefill_tokens": ids.shape[1], "decode_tokens": new_tokens, "kv_cache": cached}


def _call(model: Any, ids: torch.Tensor, **kwargs: Any) -> Any:
    # HF models take cache arguments; plain modules and callables get ids only
    try:
        return model(ids, **kwargs) if kwargs else model(ids)
    except TypeError:
        if not kwargs:
            raise
        return model(ids)


def _last_logits(out: Any) -> torch.Tensor:
    lg = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return lg[:, -1]  # (1, V)


def rss_bytes() -> int | None:
    """This process's resident set size now (psutil, or /proc on Linux); None where neither exists."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak resident memory of this whole process while the block runs, sampled by a thread.

    tracemalloc does not see torch's allocator, and ru_maxrss is a high-water mark for the process's whole
    life, so it cannot tell one configuration's peak from an earlier one's. This samples RSS every
    `interval` s (a spike shorter than that can be missed) and reports `peak_bytes` (process total,
    including the reference model and anything else alive) and `delta_bytes` (peak minus RSS at entry).
    Falls back to the ru_maxrss high-water mark, flagged by `source`, where RSS cannot be read."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self.source = "rss sampled every %d ms" % round(interval * 1000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        now = rss_bytes()
        if now is None:
            self.source = "ru_maxrss (process high-water mark)"
            self.start = self.peak = _maxrss()
            return self
        self.start = self.peak = now
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes() or 0)

    def __exit__(self, *exc: Any) -> None:
        if self._thread is None:
            self.peak = max(self.peak, _maxrss())
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() or 0)

    def result(self) -> dict[str, int | str]:
        return {"peak_bytes": self.peak, "delta_bytes": self.peak - self.start, "source": self.source}


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---- classifiers ---------------------------------------------------------------------------------------
def accuracy(model: nn.Module | Callable, inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256,
             reference: nn.Module | Callable | None = None) -> dict[str, float | int]:
    """Top-1 accuracy of a classifier on inputs (N, ...) with labels (N,); with `reference`, also the
    share of inputs where both predict the same class (agreement, as top-1 agreement for language models)."""
    if len(inputs) != len(labels) or len(labels) == 0:
        raise BitsmithError(f"accuracy needs as many labels as inputs (>0), got {len(inputs)} and {len(labels)}")

    def predict(m: Any) -> torch.Tensor:
        device = _device_of(m)
        out = []
        with _eval_mode(m), _no_grad():
            for i in range(0, len(inputs), batch_size):
                out.append(logits(m, inputs[i : i + batch_size].to(device)).argmax(-1).cpu())  # (B,)
        return torch.cat(out)  # (N,)

    pred = predict(model)
    res: dict[str, float | int] = {"accuracy": (pred == labels.cpu()).float().mean().item(), "samples": len(labels)}
    if reference is not None:
        res["agreement"] = (pred == predict(reference)).float().mean().item()
    return res


# ---- embedding models ---------------------------------------------------------------------------------
def embed(model: nn.Module, tokenizer: Any, texts: list[str], *, batch_size: int = 16,
          max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings by attention-masked mean pooling of the last hidden state (as sentence-
    transformers' MiniLM models do), L2-normalised. (N, D)"""
    out = []
    device = _device_of(model)
    with _eval_mode(model), _no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            res = model(**enc)
            hidden = res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0]  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


def retrieval_pairs(text: str, n: int = 64, min_chars: int = 80) -> tuple[list[str], list[str]]:
    """(queries, documents) from paragraphs of text: a paragraph's first line is the query for the rest of
    it, so every query has exactly one right document."""
    queries, docs = [], []
    for para in text.split("\n\n"):
        lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
        if len(lines) < 2 or len(" ".join(lines[1:])) < min_chars:
            continue
        queries.append(lines[0])
        docs.append(" ".join(lines[1:]))
        if len(queries) == n:
            break
    if len(queries) < 2:
        raise BitsmithError("the text has fewer than 2 paragraphs with a first line and a body to retrieve; "
                            "pass a longer --text")
    return queries, docs


def embedding_scores(q_emb: torch.Tensor, d_emb: torch.Tensor, ref_q: torch.Tensor,
                     ref_d: torch.Tensor) -> dict[str, float]:
    """Cosine of each embedding to the reference's (mean and min over queries and documents), retrieval
    top-1 agreement with the reference, and top-1 accuracy (query i retrieves document i)."""
    cos = torch.cat([(q_emb * ref_q).sum(-1), (d_emb * ref_d).sum(-1)])  # (2N,)
    top = (q_emb @ d_emb.T).argmax(-1)  # (N,)
    ref_top = (ref_q @ ref_d.T).argmax(-1)
    right = torch.arange(len(top))
    return {"cosine": cos.mean().item(), "cosine_min": cos.min().item(),
            "retrieval_agreement": (top == ref_top).float().mean().item(),
            "retrieval_top1": (top == right).float().mean().item(), "queries": len(top)}


# ---- helpers ------------------------------------------------------------------------------------------
def _no_grad() -> contextlib.AbstractContextManager:
    """no_grad, not inference_mode: inference tensors break third-party tensor subclasses that the
    baselines put in a model (optimum-quanto's int4 weights raise "Cannot set version_counter for inference
    tensor"), and on these model sizes inference_mode saves nothing measurable."""
    return torch.no_grad()


def _device_of(model: Any) -> torch.device:
    return model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Dropout off while measuring (it would make every number noisy and wrong); training mode restored."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
