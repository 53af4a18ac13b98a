"""bitsmith's LLM.int8() against bitsandbytes' (the reference implementation), side by side on SmolLM2-135M.

Both replace every decoder linear (the tied lm_head stays float, as transformers' bitsandbytes integration
does) from the same fp32 model and are scored on the same held-out text (seq-len 1024, 4096 tokens) at the
same outlier threshold (default 6.0). bitsandbytes runs as `bnb.nn.Linear8bitLt(has_fp16_weights=False)`
on the CPU, its own int8 path (int8_vectorwise_quant + int8_mixed_scaled_mm; it casts activations and
weights to float16 first). bitsmith runs twice with keep_dtype None, so only the LLM.int8() layers differ:
its default, the paper's zeropoint per-token activations (`Int8ZeroPointLinear`), and absmax per-token
activations (`Int8MixedLinear`, the scheme Linear8bitLt runs). Besides perplexity, each model's mean
KL(fp32 || model) of the next-token distribution over the same positions (less noisy than perplexity), and
a per-layer check on real activations compares each against the float layer.

Needs bitsandbytes (benchmark only; the library and its tests do not), e.g.
`pip install --target /tmp/bnb --no-deps bitsandbytes==0.50.2` and PYTHONPATH=/tmp/bnb:. for the run.

    .venv/bin/python -P benchmarks/llm_int8_vs_bnb.py [--threshold 6.0] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bitsmith  # noqa: E402
from bitsmith import Recipe, Scheme  # noqa: E402
from bitsmith.evaluate import eval_windows, reference_logprobs, score_windows  # noqa: E402
from bitsmith.models import load_model, load_text  # noqa: E402
from bitsmith.select import select_modules, set_submodule  # noqa: E402


def bnb_int8(model: nn.Module, threshold: float) -> nn.Module:
    """Swap every decoder linear for bitsandbytes' Linear8bitLt (weights quantized by bitsandbytes)."""
    import bitsandbytes as bnb

    for name, mod in select_modules(model, ("*",), ("lm_head",)):
        q = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
        q.weight = bnb.nn.Int8Params(mod.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.data.clone(), requires_grad=False)
        set_submodule(model, name, q.to("cpu").eval())
    return model


def ours(model: nn.Module, threshold: float, activations: str) -> nn.Module:
    args = {"threshold": threshold, "activations": activations}
    bitsmith.quantize(model, Recipe(method="llm_int8", scheme=Scheme(bits=8, group_size=None, symmetric=True),
                                    keep_dtype=None, method_args=args))
    return model


def layer_errors(ref: nn.Module, models: dict[str, nn.Module], ids: torch.Tensor
                 ) -> dict[str, dict[str, float]]:
    """Relative output error of each decoder linear against the float layer, on the float model's own
    inputs to that layer (one window), for each quantized model."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda m, i, o, n=name: inputs.__setitem__(n, i[0].detach()))
             for name, mod in select_modules(ref, ("*",), ("lm_head",))]
    with torch.inference_mode():
        ref(ids)
    for h in hooks:
        h.remove()
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, x in inputs.items():
            y = ref.get_submodule(name)(x)
            out[name] = {k: float((m.get_submodule(name)(x).float() - y).norm() / y.norm())
                         for k, m in models.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threshold", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m")
    _, text = load_text(None)
    models = {"bitsandbytes": bnb_int8(copy.deepcopy(lm.model), a.threshold),
              "bitsmith": ours(copy.deepcopy(lm.model), a.threshold, "zeropoint"),
              "bitsmith_absmax": ours(copy.deepcopy(lm.model), a.threshold, "absmax")}
    import bitsandbytes

    rows = {"threshold": a.threshold, "bitsandbytes_version": bitsandbytes.__version__, "kl": {}}
    windows = eval_windows(lm.tokenizer, text, seq_len=1024, max_tokens=4096)
    ref = reference_logprobs(lm.model, windows)
    with torch.inference_mode():
        rows["fp32"] = score_windows(lm.model, windows)["ppl"]
        for label, m in models.items():
            r = score_windows(m, windows, ref)
            rows[label], rows["kl"][label] = r["ppl"], r["kl"]
            print(f"{label}: ppl {r['ppl']:.3f} ({100 * (r['ppl'] / rows['fp32'] - 1):+.2f}% vs fp32 "
                  f"{rows['fp32']:.3f}), KL {r['kl']:.5f}", flush=True)
    ids = windows[:1]
    errs = layer_errors(lm.model, models, ids)
    rows["layers"] = len(errs)
    rows["mean_layer_rel_err"] = {k: sum(e[k] for e in errs.values()) / len(errs) for k in models}
    for k in ("bitsmith", "bitsmith_absmax"):
        rows[f"{k}_not_worse_layers"] = sum(e[k] <= e["bitsandbytes"] for e in errs.values())
    print(f"per-layer relative output error (mean over {len(errs)} linears): "
          + ", ".join(f"{k} {v:.5f}" for k, v in rows["mean_layer_rel_err"].items())
          + f"; not worse than bitsandbytes: bitsmith on {rows['bitsmith_not_worse_layers']}, "
          f"bitsmith_absmax on {rows['bitsmith_absmax_not_worse_layers']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**rows, "per_layer": errs}, f, indent=1)


if __name__ == "__main__":
    main()
