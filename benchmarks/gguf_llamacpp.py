"""GGUF export measured in llama.cpp (llama-cpp-python) against bitsmith's own forward, on SmolLM2-135M.

Rows (perplexity over the same held-out token windows, bitsmith's tokenizer; llama.cpp gets the token ids):
  imported-q4_1   the bundled Q4_1 GGUF imported as QWeights, exported again as Q4_1 (byte-identical check)
  rtn-q4_0        RTN on Q4_0's grid (--gguf-compatible Q4_0), exported per layer (lossless Q4_0, F16 embedding)
  gptq-q4_0       GPTQ on Q4_0's grid, exported --type Q4_0 (linears lossless, tied embedding Q8_0)
  ggml-q4_0       the float model exported --type Q4_0: ggml's own Q4_0 rounding (bit-exact to gguf.quants)
  llama-quantize  the float model exported F32, then quantized to Q4_0 by llama.cpp's llama_model_quantize
Run under the shared lock: flock /tmp/bitsmith-heavy.lock .venv/bin/python benchmarks/gguf_llamacpp.py
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import time
from pathlib import Path
import tempfile

import numpy as np
import torch


def tensor_bytes(path: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import llama_cpp

    from bitsmith.apply import quantize_model
    from bitsmith.baselines import LlamaCppModel
    from bitsmith.evaluate import eval_windows, score_windows
    from bitsmith.export import export
    from bitsmith.export.gguf_blocks import gguf_scheme
    from bitsmith.importers.gguf import load as import_gguf
    from bitsmith.models import bundled_path, load_model, load_text
    from bitsmith.recipe import Recipe

    tmp = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    src = bundled_path("smollm2-135m")
    base = load_model("smollm2-135m")
    windows = eval_windows(base.tokenizer, load_text(None)[1], seq_len=a.seq_len, max_tokens=a.max_tokens)
    rows, out = [], {"windows": list(windows.shape), "threads": a.threads}

    def row(name: str, model, path: Path, **extra) -> None:
        t0 = time.perf_counter()
        ours = score_windows(model, windows)["ppl"] if model is not None else None
        t1 = time.perf_counter()
        llm = LlamaCppModel(path, n_ctx=a.seq_len)
        theirs = score_windows(llm, windows)["ppl"]
        t2 = time.perf_counter()
        del llm
        r = {"row": name, "ppl_bitsmith": ours, "ppl_llamacpp": theirs, "file_bytes": path.stat().st_size,
             "rel_diff": None if ours is None else abs(theirs - ours) / ours, "s_bitsmith": round(t1 - t0, 1),
             "s_llamacpp": round(t2 - t1, 1), **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    # 1. the bundled Q4_1 file, imported and written again
    t0 = time.perf_counter()
    imp = import_gguf(src)
    t_imp = time.perf_counter() - t0
    p = tmp / "imported-q4_1.gguf"
    t0 = time.perf_counter()
    s = export(imp, "gguf", p, type="Q4_1")
    t_exp = time.perf_counter() - t0
    a_b, b_b = tensor_bytes(src), tensor_bytes(p)
    same = sum(a_b[k] == b_b.get(k) for k in a_b)
    row("imported-q4_1", imp.model, p, identical_tensors=f"{same}/{len(a_b)}", import_s=round(t_imp, 1),
        export_s=round(t_exp, 1), lossless=s["lossless"])
    del imp

    # 2. RTN on Q4_0's grid, per-layer types (lossless Q4_0 linears)
    rtn = copy.deepcopy(base.model)
    quantize_model(rtn, Recipe(method="rtn", scheme=gguf_scheme("Q4_0")))
    p = tmp / "rtn-q4_0.gguf"
    s = export(type(base)(rtn, base.tokenizer, "rtn", "causal-lm", base.source_dir), "gguf", p)
    row("rtn-q4_0", rtn, p, lossless=s["lossless"], re_encoded=s["re_encoded"])
    del rtn

    # 3. GPTQ on Q4_0's grid, --type Q4_0
    gptq = copy.deepcopy(base.model)
    t0 = time.perf_counter()
    quantize_model(gptq, Recipe(method="gptq", scheme=gguf_scheme("Q4_0")), tokenizer=base.tokenizer,
                   calib_text=load_text(None)[0], n_samples=a.calib_samples, seq_len=a.calib_seq_len)
    t_q = time.perf_counter() - t0
    p = tmp / "gptq-q4_0.gguf"
    s = export(type(base)(gptq, base.tokenizer, "gptq", "causal-lm", base.source_dir), "gguf", p, type="Q4_0")
    row("gptq-q4_0", gptq, p, lossless=s["lossless"], re_encoded=s["re_encoded"], quantize_s=round(t_q, 1))
    del gptq

    # 4. ggml's own Q4_0 from the same float weights (bitsmith's bit-exact encoder), and 5. llama-quantize's
    p = tmp / "ggml-q4_0.gguf"
    export(base, "gguf", p, type="Q4_0")
    row("ggml-q4_0", None, p)
    f32 = tmp / "f32.gguf"
    export(base, "gguf", f32, type="F32")
    q = tmp / "llama-quantize-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = a.threads
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(q).encode(), ctypes.byref(params))
    assert rc == 0, rc
    ours_b, theirs_b = tensor_bytes(p), tensor_bytes(q)
    same = sum(ours_b[k] == theirs_b.get(k) for k in ours_b)
    row("llama-quantize-q4_0", None, q, identical_to_ggml_q4_0=f"{same}/{len(ours_b)}",
        types=sorted({v[0] for v in theirs_b.values()}))
    out["rows"] = rows
    out["base_ppl_bitsmith"] = score_windows(base.model, windows)["ppl"]
    print(json.dumps({"base_ppl_bitsmith": out["base_ppl_bitsmith"]}))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
