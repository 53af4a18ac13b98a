"""GPU half of benchmarks/decode.py: a Llama-3-8B-shaped decoder with random weights, one decode step
(batch B, context CTX already cached) captured in a CUDA graph and replayed; bf16 vs bitsmith W4 g128 vs W8
per-channel. Every block linear (q, k, v, o, gate, up, down) is quantized; embeddings and the untied
lm_head stay bf16 (as a quantized checkpoint usually keeps them). RoPE is left out (elementwise, <1% of a
step). Random codes and scales: speed does not depend on the values.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.nn import QuantLinear
from bitsmith.recipe import Scheme

LLAMA3_8B = {"layers": 32, "d": 4096, "ff": 14336, "heads": 32, "kv": 8, "vocab": 128256}
CTX = 512


def linear(k: int, n: int, scheme: Scheme | None, device: str) -> nn.Module:
    if scheme is None:
        lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        nn.init.normal_(lin.weight, std=0.02)
        return lin
    m = QuantLinear(k, n, scheme, zero="none" if scheme.symmetric else "packed").to(device)
    m.qcodes.random_(0, 256)                  # random bytes = random codes at any width
    m.scale.uniform_(1e-3, 2e-3)
    if hasattr(m, "qzero"):
        m.qzero.random_(0, 256)
    return m


class Block(nn.Module):
    def __init__(self, c: dict, scheme: Scheme | None, batch: int, device: str) -> None:
        super().__init__()
        d, hd = c["d"], c["d"] // c["heads"]
        self.c, self.hd = c, hd
        self.q = linear(d, d, scheme, device)
        self.k = linear(d, c["kv"] * hd, scheme, device)
        self.v = linear(d, c["kv"] * hd, scheme, device)
        self.o = linear(d, d, scheme, device)
        self.gate = linear(d, c["ff"], scheme, device)
        self.up = linear(d, c["ff"], scheme, device)
        self.down = linear(c["ff"], d, scheme, device)
        self.n1 = nn.RMSNorm(d, device=device, dtype=torch.bfloat16)
        self.n2 = nn.RMSNorm(d, device=device, dtype=torch.bfloat16)
        shape = (batch, c["kv"], CTX + 1, hd)
        self.register_buffer("kc", torch.randn(shape, device=device, dtype=torch.bfloat16))
        self.register_buffer("vc", torch.randn(shape, device=device, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x (B, d), one new token per sequence
        b = x.shape[0]
        h = self.n1(x)
        q = self.q(h).view(b, self.c["heads"], 1, self.hd)
        self.kc[:, :, CTX] = self.k(h).view(b, self.c["kv"], self.hd)
        self.vc[:, :, CTX] = self.v(h).view(b, self.c["kv"], self.hd)
        a = F.scaled_dot_product_attention(q, self.kc, self.vc, enable_gqa=True).reshape(b, -1)
        x = x + self.o(a)
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    def __init__(self, c: dict, scheme: Scheme | None, batch: int, device: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(c["vocab"], c["d"], device=device, dtype=torch.bfloat16)
        self.blocks = nn.ModuleList(Block(c, scheme, batch, device) for _ in range(c["layers"]))
        self.norm = nn.RMSNorm(c["d"], device=device, dtype=torch.bfloat16)
        self.head = linear(c["d"], c["vocab"], None, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:         # ids (B,) -> next ids (B,)
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)).argmax(-1)


@torch.no_grad()
def step_ms(model: Decoder, batch: int, device: str, graph: bool = True) -> float:
    ids = torch.randint(0, model.emb.num_embeddings, (batch,), device=device)
    for _ in range(2):
        model(ids)                                                # warm-up: compiles, builds kernel operands
    if not graph:
        import time
        t0 = time.perf_counter()
        model(ids)
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = model(ids)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    del out, g
    return statistics.median(times)


def gpu(config: dict = LLAMA3_8B, batches=(1, 16), device: str = "cuda", graph: bool = True) -> list[dict]:
    import json
    rows = []
    for label, scheme in (("bf16", None), ("W4 g128", Scheme(bits=4, group_size=128)),
                          ("W8 per-channel", Scheme(bits=8, group_size=None, symmetric=True))):
        for batch in batches:
            model = Decoder(config, scheme, batch, device)
            ms = step_ms(model, batch, device, graph)
            row = {"model": label, "policy": "auto", "batch": batch, "kernel": ["graph" if graph else "eager"],
                   "step_ms": ms, "decode_tokens_per_s": batch * 1e3 / ms}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows
