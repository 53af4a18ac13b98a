"""Exports in their runtimes, on the real models: what each file costs on disk and how close the runtime's
numbers are to bitsmith's own forward of the same quantized model.

  onnx-matmulnbits  SmolLM2-135M, RTN 4-bit g64: ONNX Runtime perplexity vs bitsmith's on the same windows,
                    greedy tokens of a prompt, export seconds, file size
  onnx-qdq          MiniLM-L6, bitsmith's static W8A8 (issue 7): embedding cosine ORT vs bitsmith
                    (-reduce-range: 7-bit weights, which ORT's int8 kernels multiply exactly without VNNI),
                    next to bitsmith vs itself with its embedding output perturbed by 1e-7 (relative, about
                    one float32 rounding): how far float-rounding-level differences alone move the output
  compressed-tensors SmolLM2-135M, RTN 4-bit g64 symmetric: transformers (+ compressed-tensors) logits vs bitsmith
                    (-asym-block: asymmetric, asym_strategy=block, default load; -asym-group: asymmetric in the
                    package's own group layout, loaded with CompressedTensorsConfig(dequantize=True))
  mlx               SmolLM2-135M, RTN 4-bit g64: mlx-lm logits and greedy tokens vs bitsmith

Whole-model runs: take the shared lock on the 2-core machines.

    flock /tmp/bitsmith-heavy.lock .venv/bin/python benchmarks/export_runtimes.py --rows onnx-matmulnbits
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bitsmith
from bitsmith import Recipe, Scheme
from bitsmith.models import LoadedModel, load_model, load_text

PROMPT = "The Python tutorial explains"


def _greedy(step, ids: torch.Tensor, n: int) -> list[int]:
    for _ in range(n):
        ids = torch.cat([ids, step(ids)[:, -1:].argmax(-1).to(ids.dtype)], 1)
    return ids[0].tolist()


def _w4(lm, symmetric: bool = False) -> LoadedModel:
    model = copy.deepcopy(lm.model)
    bitsmith.quantize(model, Recipe(method="rtn", scheme=Scheme(bits=4, group_size=64, symmetric=symmetric)))
    return LoadedModel(model, lm.tokenizer, lm.name + "-w4", lm.kind, None)


def _size(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def onnx_matmulnbits(tokens: int, seq_len: int) -> dict:
    import onnxruntime as ort

    from bitsmith.evaluate import eval_windows, score_windows
    from bitsmith.export import export

    lm = _w4(load_model("smollm2-135m"))
    held = load_text(None)[1]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = export(lm, "onnx", Path(d) / "onnx")
        secs = time.perf_counter() - t
        sess = ort.InferenceSession(str(Path(d) / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])

        def run(ids: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])

        windows = eval_windows(lm.tokenizer, held, seq_len=seq_len, max_tokens=tokens)
        ours, theirs = score_windows(lm.model, windows), score_windows(run, windows, device="cpu")
        ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            g_ours, g_ort = _greedy(lambda x: lm.model(x).logits, ids, 16), _greedy(run, ids, 16)
        return {"row": "onnx-matmulnbits", "model": "smollm2-135m rtn w4 g64", "export_s": round(secs, 1),
                "size_mb": round(_size(Path(d) / "onnx"), 1), "nodes": res["nodes"],
                "ppl_bitsmith": round(ours["ppl"], 4), "ppl_onnxruntime": round(theirs["ppl"], 4),
                "ppl_rel_diff": theirs["ppl"] / ours["ppl"] - 1, "tokens": ours["tokens"],
                "greedy_equal": g_ours == g_ort, "greedy_text": lm.tokenizer.decode(g_ort[ids.shape[1]:])}


def _perturbed(model: torch.nn.Module, tokenizer, texts: list[str], eps: float) -> torch.Tensor:
    """Embeddings with the embedding layer's output multiplied by (1 + eps N(0, 1)): a float-rounding-sized
    change at the bottom of the encoder, the kind of difference two correct float implementations have."""
    from bitsmith.evaluate import embed

    g = torch.Generator().manual_seed(0)
    hook = model.embeddings.register_forward_hook(lambda m, i, o: o * (1 + eps * torch.randn(o.shape, generator=g)))
    try:
        return embed(model, tokenizer, texts)
    finally:
        hook.remove()


def onnx_qdq(samples: int, reduce_range: bool, observer: str, smoothquant: str | None = None) -> dict:
    import onnxruntime as ort

    from bitsmith.evaluate import embed
    from bitsmith.export import export

    lm = load_model("minilm-l6")
    fp = copy.deepcopy(lm.model)
    recipe = Recipe(method="w8a8", scheme=Scheme(bits=8, group_size=None, symmetric=True),
                    method_args={"reduce_range": reduce_range, "observer": observer,
                                 **({"smoothquant": smoothquant} if smoothquant else {})})
    bitsmith.quantize(lm.model, recipe, tokenizer=lm.tokenizer, n_samples=16, seq_len=128)
    texts = [p for p in load_text(None)[1].split("\n\n") if len(p) > 40][:samples]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = export(lm, "onnx", Path(d) / "onnx")
        secs = time.perf_counter() - t
        sess = ort.InferenceSession(str(Path(d) / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])

        class Runtime(torch.nn.Module):
            def forward(self, input_ids, attention_mask, token_type_ids=None):
                feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
                return (torch.from_numpy(sess.run(None, feeds)[0]),)

        got = embed(Runtime(), lm.tokenizer, texts)
        size = _size(Path(d) / "onnx")
    ours, ref = embed(lm.model, lm.tokenizer, texts), embed(fp, lm.tokenizer, texts)
    cos, cos_fp = (got * ours).sum(-1), (got * ref).sum(-1)
    self_cos = (_perturbed(lm.model, lm.tokenizer, texts, 1e-7) * ours).sum(-1)
    name = f"minilm-l6 w8a8 static {observer}{' reduce_range' if reduce_range else ''}"
    name += f" smoothquant={smoothquant}" if smoothquant else ""
    return {"row": "onnx-qdq", "model": name,
            "export_s": round(secs, 1), "size_mb": round(size, 1), "nodes": res["nodes"],
            "cosine_vs_bitsmith_mean": float(cos.mean()), "cosine_vs_bitsmith_min": float(cos.min()),
            "bitsmith_vs_itself_perturbed_1e-7_mean": float(self_cos.mean()),
            "bitsmith_vs_itself_perturbed_1e-7_min": float(self_cos.min()),
            "cosine_vs_fp32_mean": float(cos_fp.mean()), "bitsmith_vs_fp32_mean": float((ours * ref).sum(-1).mean()),
            "texts": len(texts)}


def compressed_tensors(variant: str = "") -> dict:
    import transformers

    from bitsmith.export import export

    symmetric = not variant
    strategy = "block" if variant == "asym-block" else "group"
    load = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if variant == "asym-group" else {}
    lm = _w4(load_model("smollm2-135m"), symmetric=symmetric)
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with tempfile.TemporaryDirectory() as d:
        export(lm, "compressed-tensors", Path(d) / "ct", asym_strategy=strategy)
        t = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(d) / "ct"), dtype=torch.float32, **load).eval()
        load_s = time.perf_counter() - t
        size = _size(Path(d) / "ct")
    with torch.no_grad():
        a, b = lm.model(ids).logits, hf(ids).logits
        g_ours, g_hf = _greedy(lambda x: lm.model(x).logits, ids, 16), _greedy(lambda x: hf(x).logits, ids, 16)
    how = "sym" if symmetric else f"asym, strategy {strategy}{', dequantize=True' if load else ''}"
    return {"row": "compressed-tensors" + (f"-{variant}" if variant else ""), "model": f"smollm2-135m rtn w4 g64 {how}",
            "size_mb": round(size, 1), "load_s": round(load_s, 1), "max_abs_logit_diff": float((a - b).abs().max()),
            "max_abs_logit": float(a.abs().max()), "greedy_equal": g_ours == g_hf}


def mlx() -> dict:
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_load

    from bitsmith.export import export

    lm = _w4(load_model("smollm2-135m"))
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with tempfile.TemporaryDirectory() as d:
        export(lm, "mlx", Path(d) / "mlx", dtype="float32")
        model, _ = mlx_load(Path(d) / "mlx")
        size = _size(Path(d) / "mlx")

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.array(model(mx.array(x.numpy()))))

        with torch.no_grad():
            a, b = lm.model(ids).logits, run(ids)
            g_ours, g_mlx = _greedy(lambda x: lm.model(x).logits, ids, 16), _greedy(run, ids, 16)
    return {"row": "mlx", "model": "smollm2-135m rtn w4 g64 (float32 scales/biases)", "size_mb": round(size, 1),
            "max_abs_logit_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
            "greedy_equal": g_ours == g_mlx}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="onnx-matmulnbits,onnx-qdq,onnx-qdq-reduce-range,compressed-tensors,"
                                      "compressed-tensors-asym-block,compressed-tensors-asym-group,mlx")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--observer", default="minmax", help="the W8A8 activation observer of the onnx-qdq rows")
    ap.add_argument("--smoothquant", help="alpha or 'auto' for the W8A8 of the onnx-qdq rows (default: none)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for row in a.rows.split(","):
        if row == "onnx-matmulnbits":
            rows.append(onnx_matmulnbits(a.tokens, a.seq_len))
        elif row in ("onnx-qdq", "onnx-qdq-reduce-range"):
            rows.append(onnx_qdq(64, reduce_range=row.endswith("range"), observer=a.observer,
                                 smoothquant=a.smoothquant))
        elif row.startswith("compressed-tensors"):
            rows.append(compressed_tensors(row.removeprefix("compressed-tensors").lstrip("-")))
        elif row == "mlx":
            rows.append(mlx())
        else:
            raise SystemExit(f"unknown row {row}")
        print(json.dumps(rows[-1], default=str), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
