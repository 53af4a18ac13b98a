"""Where LLM.int8()'s perplexity loss on SmolLM2-135M comes from: weights against activations, the
outlier columns' weights, absmax against zeropoint activations, per module type and per block.

Every decoder linear is quantized by `llm_int8` (threshold 6.0, lm_head float) and then wrapped by a
probe that computes one variant of the layer in float from the same int8 weights (fake quantization;
`bitsmith.nn.per_token_int8` rounds the activations exactly as the run-time modules do):

    weights    int8 (the module's codes x row scales) or float (the model's own weights)
    acts       absmax or zeropoint per-token int8, or float (no activation rounding)
    outlier_w  the weight columns the float outlier path multiplies: int8-dequantized (what bitsmith and
               bitsandbytes' Linear8bitLt store) or float (the paper's 16-bit columns, which int8 storage
               does not keep)
    types / blocks  where the activation rounding is on (elsewhere activations stay float)

Each row reports perplexity and the mean KL(fp32 || model) over the same positions (KL adds up over
layers far better than perplexity differences do). Text: the held-out split (default) or the calibration
split (`--split calib`, to choose between variants without looking at the evaluation text).

    .venv/bin/python -P benchmarks/llm_int8_attribution.py [--split eval] [--rows NAME ...] [--json out.jsonl]
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
from bitsmith.nn import Int8MixedLinear, per_token_int8  # noqa: E402
from bitsmith.select import set_submodule  # noqa: E402

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCKS = [tuple(range(b, b + 5)) for b in range(0, 30, 5)]
DEFAULT = {"weights": "int8", "acts": "absmax", "outlier_w": "int8", "types": None, "blocks": None}
ROWS: dict[str, dict] = {       # name: what the row changes from DEFAULT
    "absmax": {},
    "weights-only": {"acts": "float"},
    "acts-only": {"weights": "float", "outlier_w": "float"},
    "absmax-float-outlier-w": {"outlier_w": "float"},
    "zeropoint": {"acts": "zeropoint"},
    "zeropoint-float-outlier-w": {"acts": "zeropoint", "outlier_w": "float"},
    "zeropoint-acts-only": {"acts": "zeropoint", "weights": "float", "outlier_w": "float"},
    **{f"{a}-{t}": {"acts": a, "types": (t,)} for a in ("absmax", "zeropoint") for t in TYPES},
    **{f"{a}-blocks{b[0]}-{b[-1]}": {"acts": a, "blocks": b}
       for a in ("absmax", "zeropoint") for b in BLOCKS},
}


class Probe(nn.Module):
    """One LLM.int8() layer computed as the current variant says (see the module docstring)."""

    def __init__(self, mod: Int8MixedLinear, w_float: torch.Tensor, kind: str, block: int, variant: dict):
        super().__init__()
        self.mod, self.w_float, self.kind, self.block, self.variant = mod, w_float, kind, block, variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = {**DEFAULT, **self.variant}
        on = ((v["types"] is None or self.kind in v["types"])
              and (v["blocks"] is None or self.block in v["blocks"]))
        x2 = x.reshape(-1, self.mod.k).float()                                   # (M, K)
        cols = (x2.abs() > self.mod.outlier_threshold).any(0)                   # (K,)
        w_int8 = self.mod.dequantize(torch.float32)                              # (N, K)
        w = self.w_float if v["weights"] == "float" else w_int8
        w_out = self.w_float if v["outlier_w"] == "float" else w_int8
        xr = x2.masked_fill(cols, 0.0)
        if on and v["acts"] != "float":
            q, s, z = per_token_int8(xr, v["acts"] == "zeropoint")
            xr = s * (q.float() - (0.0 if z is None else z.float()))
        y = xr @ w.t() + x2[:, cols] @ w_out[:, cols].t()
        if self.mod.bias is not None:
            y = y + self.mod.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.mod.out_features)


def probed(model: nn.Module, variant: dict) -> nn.Module:
    """A copy of the fp32 model with every decoder linear LLM.int8()-quantized and wrapped by a Probe
    that reads `variant` (a dict the caller updates in place between rows)."""
    q = copy.deepcopy(model)
    bitsmith.quantize(q, Recipe(method="llm_int8", scheme=Scheme(bits=8, group_size=None, symmetric=True),
                                keep_dtype=None, method_args={"activations": "absmax"}))
    for name, mod in list(q.named_modules()):
        if isinstance(mod, Int8MixedLinear):
            w = model.get_submodule(name).weight.detach().float()
            set_submodule(q, name, Probe(mod, w, name.split(".")[-1], int(name.split(".")[2]), variant))
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("eval", "calib"), default="eval")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to run (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="append one JSON line per row to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m")
    calib_text, eval_text = load_text(None)
    windows = eval_windows(lm.tokenizer, eval_text if a.split == "eval" else calib_text, seq_len=1024,
                           max_tokens=4096)
    ref = reference_logprobs(lm.model, windows)
    fp32 = score_windows(lm.model, windows)["ppl"]
    print(f"fp32 ppl {fp32:.4f} ({a.split} split, {windows.numel()} tokens)", flush=True)
    variant: dict = {}
    model = probed(lm.model, variant)
    out = open(a.json, "a") if a.json else None      # appended row by row: a killed run keeps its rows
    for name in a.rows or list(ROWS):
        variant.clear()
        variant.update(ROWS[name])
        r = score_windows(model, windows, ref)
        line = json.dumps({"row": name, "split": a.split, "ppl": r["ppl"], "kl": r["kl"], "fp32_ppl": fp32,
                           "vs_fp32_pct": 100 * (r["ppl"] / fp32 - 1)})
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()


if __name__ == "__main__":
    main()
