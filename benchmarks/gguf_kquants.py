"""bitsmith's K-quant encoders against llama.cpp's own (llama_model_quantize) on the same weights: SQNR and
the share of byte-identical blocks. Needs llama-cpp-python. Small (two 1024x1024 tensors), no lock needed.

    .venv/bin/python benchmarks/gguf_kquants.py
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path

import numpy as np
import torch


def sqnr(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10((x ** 2).sum() / ((x - y) ** 2).sum()))


def main() -> None:
    import gguf
    import llama_cpp

    from bitsmith.export import gguf_blocks as gb

    torch.manual_seed(0)
    d = Path(tempfile.mkdtemp(prefix="kquants-"))
    weights = {"blk.0.ffn_up.weight": (torch.randn(1024, 1024) * (1 + 0.5 * torch.rand(1024, 1))).numpy(),
               "blk.0.ffn_gate.weight": torch.distributions.StudentT(4).sample((1024, 1024)).numpy()}
    w = gguf.GGUFWriter(str(d / "f32.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(1024)
    w.add_feed_forward_length(1024)
    w.add_head_count(8)
    w.add_head_count_kv(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(256)
    for name, t in weights.items():
        w.add_tensor(name, t.astype(np.float32))
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes([i]).decode("latin1") for i in range(256)])
    w.add_token_types([1] * 256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{'ftype':7} {'tensor':22} {'type':5} {'llama.cpp dB':>12} {'bitsmith dB':>11} {'same blocks':>11}")
    for ftype in ("Q4_K_S", "Q5_K_S", "Q6_K"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 1
        out = d / f"{ftype}.gguf"
        assert llama_cpp.llama_model_quantize(str(d / "f32.gguf").encode(), str(out).encode(),
                                              ctypes.byref(params)) == 0
        for t in gguf.GGUFReader(out).tensors:
            ref, qt = weights[t.name], t.tensor_type.name
            mine = gb.encode(torch.from_numpy(ref), qt).numpy()
            ts = gb.BLOCK_TYPES[qt].type_size
            same = (mine.reshape(-1, ts) == np.asarray(t.data).reshape(-1, ts)).all(1).mean()
            ours = gb.dequantize_blocks(torch.from_numpy(mine), qt, ref.shape).numpy()
            print(f"{ftype:7} {t.name:22} {qt:5} {sqnr(ref, gguf.quants.dequantize(t.data, t.tensor_type)):12.2f} "
                  f"{sqnr(ref, ours):11.2f} {same:11.1%}")


if __name__ == "__main__":
    main()
