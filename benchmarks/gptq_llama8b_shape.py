"""Quantization cost of GPTQ on a model of real shapes with random weights (the cost depends on shapes only).

--shape llama8b (default): Llama-3-8B: 32 blocks, hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab
128256, float16 on CUDA; 128 x 2048 random calibration tokens, w4 g128. The model lives on the CPU and each
block visits the GPU in turn (the engine's `device=`), so peak GPU memory is one block, the captured
activations and GPTQ's Hessians. Prints the quantization seconds and torch.cuda.max_memory_allocated
(issue 3: <= 10 minutes and <= 24 GB on an H100).
--shape smollm2: SmolLM2-135M (30 blocks, hidden 576, MLP 1536, 9 heads / 3 KV heads, tied embeddings),
float32 on the CPU, 128 x 512 tokens (bitsmith's default calibration), w4 g64: the CPU cost on --threads
cores, with peak RSS. Pin the cores too (taskset -c 0,1) so that other work cannot lend it more.

    python benchmarks/gptq_llama8b_shape.py                # on a CUDA machine
    taskset -c 0,1 python benchmarks/gptq_llama8b_shape.py --shape smollm2 --device cpu --threads 2
    python benchmarks/gptq_llama8b_shape.py --tiny         # 2 blocks, hidden 256: checks it runs, any device
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time

import torch

# not this folder: a script here named like a package (kernels.py) would shadow it
sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


SHAPES = {
    "llama8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": False},
}
DEFAULTS = {"llama8b": (128, 2048, 128), "smollm2": (128, 512, 64), "tiny": (8, 128, 128)}   # samples, len, group


def build(shape: str, dtype: torch.dtype, init_device: torch.device):
    """A LlamaForCausalLM with random N(0, 0.02) weights and unit norms, on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")      # cast on meta: no float32 copy of 8B weights
    gen = torch.Generator(device=init_device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Fill on the fast device (8B normals on the CPU take minutes), one tensor at a time.
            t = torch.empty(p.shape, dtype=torch.float32, device=init_device)
            if p.dim() == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            p.copy_(t.to(dtype))
    # to_empty left the rotary buffers uninitialised: build that module again from the config
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval(), config


class _PeakGpu(logging.Filter):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def filter(self, record: logging.LogRecord) -> bool:
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        record.msg = f"{record.msg} (peak GPU memory so far {peak:.2f} GiB)"
        return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    p.add_argument("--tiny", action="store_true", help="--shape tiny: 2 blocks, hidden 256, 8 x 128 tokens")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from bitsmith.apply import quantize_model
    from bitsmith.recipe import Recipe, Scheme

    shape = "tiny" if a.tiny else a.shape
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":        # each "block i/n done" line also says the peak so far: a cut run still tells
        logging.getLogger("bitsmith.calibrate").addFilter(_PeakGpu(device))
    samples, seq_len, group = DEFAULTS[shape]
    samples, seq_len = a.samples or samples, a.seq_len or seq_len
    t0 = time.perf_counter()
    model, config = build(shape, dtype, device)
    print(f"built {config.num_hidden_layers} blocks, hidden {config.hidden_size} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    ids = torch.randint(0, config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(method="gptq", scheme=Scheme(bits=4, group_size=group),
                    method_args={"act_order": True} if a.act_order else {})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    report = quantize_model(model, recipe, calib_ids=ids, batch_size=a.batch_size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    errs = [r["out_rel_err"] / r["out_rel_err_before"] for r in report if r.get("out_rel_err_before")]
    result = {"shape": shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
              "blocks": config.num_hidden_layers, "hidden": config.hidden_size,
              "mlp": config.intermediate_size, "kv_heads": config.num_key_value_heads,
              "calib": [samples, seq_len], "scheme": recipe.scheme.label(), "act_order": a.act_order,
              "layers": len(report), "seconds": round(seconds, 1),
              "peak_gpu_gib": None if peak is None else round(peak, 2),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "fallbacks": sum(1 for r in report if r.get("fallback")),
              "mean_out_err_vs_rtn": round(sum(errs) / max(len(errs), 1), 4)}
    print(json.dumps(result), flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
