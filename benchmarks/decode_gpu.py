"""GPU half of benchmarks/decode.py: a Llama-3-8B-shaped decoder with random weights, one decode step
(batch B, context CTX already cached) captured in a CUDA graph and replayed; bf16 vs bitsmith W4 g128 vs W8
per-channel. Every block linear (q, k, v, o, gate, up, down) is quantized; embeddings stay bf16, the
untied lm_head too unless the variant says `head`. RoPE is left out (elementwise, <1% of a step). Random
codes and scales: speed does not depend on the values.

Variants (explicit options of the model, the same for bf16 and the quantized models), joined by "+":
  plain  seven linears per block, torch's RMSNorm / SiLU / adds (the model of earlier runs)
  fused  q/k/v as one linear of 6144 rows and gate/up as one of 28672 (their weights stacked by rows: for
         bitsmith's row-wise codes, scales and zeros stacking is exact, so one QuantLinear over the stacked
         weight computes the three / two products bit-for-bit; here the weights are random anyway)
  head   the lm_head quantized with the blocks' scheme (default: bf16)
  glue   residual add + RMSNorm and SiLU * up as one Triton launch each (decode_glue.py)
  attn   the attention of the step as one Triton launch that also writes k, v into the cache
         (decode_glue.decode_attention), instead of two cache copies + SDPA
  pdl    the glue kernels and bitsmith's M = 1 GEMV launched as programmatic dependent launches (Hopper:
         kernels.set_pdl); cuBLAS's bf16 GEMVs are launched as torch launches them
`kernel` forces one weight-only kernel for the quantized linears (a kernels policy; "auto" = dispatch).
--profile adds, per quantized/bf16 model at batch 1, torch.profiler's CUDA kernel time per step (eager
steps, so the kernel times are those of the graph without its launch gaps).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.nn import QuantLinear
from bitsmith.recipe import Scheme

from benchmarks import decode_glue as glue

LLAMA3_8B = {"layers": 32, "d": 4096, "ff": 14336, "heads": 32, "kv": 8, "vocab": 128256}
CTX = 512


VARIANT_FLAGS = ("plain", "fused", "head", "glue", "attn", "pdl")


def flags(variant: str) -> set[str]:
    f = set(variant.split("+"))
    if f - set(VARIANT_FLAGS):
        raise ValueError(f"unknown decode variant part(s) {sorted(f - set(VARIANT_FLAGS))} "
                         f"(parts: {VARIANT_FLAGS})")
    return f


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
    def __init__(self, c: dict, scheme: Scheme | None, batch: int, device: str,
                 f: set[str] = frozenset()) -> None:
        super().__init__()
        d, hd = c["d"], c["d"] // c["heads"]
        self.c, self.hd, self.fused, self.glue = c, hd, "fused" in f, "glue" in f
        self.attn, self.pdl = "attn" in f, "pdl" in f
        if self.fused:
            self.qkv = linear(d, d + 2 * c["kv"] * hd, scheme, device)
            self.gateup = linear(d, 2 * c["ff"], scheme, device)
        else:
            self.q = linear(d, d, scheme, device)
            self.k = linear(d, c["kv"] * hd, scheme, device)
            self.v = linear(d, c["kv"] * hd, scheme, device)
            self.gate = linear(d, c["ff"], scheme, device)
            self.up = linear(d, c["ff"], scheme, device)
        self.o = linear(d, d, scheme, device)
        self.down = linear(c["ff"], d, scheme, device)
        self.n1 = nn.RMSNorm(d, device=device, dtype=torch.bfloat16)
        self.n2 = nn.RMSNorm(d, device=device, dtype=torch.bfloat16)
        shape = (batch, c["kv"], CTX + 1, hd)
        self.register_buffer("kc", torch.randn(shape, device=device, dtype=torch.bfloat16))
        self.register_buffer("vc", torch.randn(shape, device=device, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, d), one new token per sequence. `glue`: x is updated in place and the block returns the
        down projection, which the next add_rmsnorm adds to x (h = that norm of x, computed by the caller)."""
        b, c, hd = x.shape[0], self.c, self.hd
        if h is None:
            h = self.n1(x)
        if self.fused:
            qkv = self.qkv(h)
            q, k, v = qkv.split([c["d"], c["kv"] * hd, c["kv"] * hd], dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        if self.attn:
            a = glue.decode_attention(q, k, v, self.kc, self.vc, CTX, c["heads"], pdl=self.pdl)
        else:
            q = q.reshape(b, c["heads"], 1, hd)
            self.kc[:, :, CTX] = k.reshape(b, c["kv"], hd)
            self.vc[:, :, CTX] = v.reshape(b, c["kv"], hd)
            a = F.scaled_dot_product_attention(q, self.kc, self.vc, enable_gqa=True).reshape(b, -1)
        if self.glue:
            h = glue.add_rmsnorm(x, self.o(a), self.n2, self.pdl)
            gu = self.gateup(h) if self.fused else torch.cat([self.gate(h), self.up(h)], -1)
            return self.down(glue.silu_mul(gu, self.pdl))
        x = x + self.o(a)
        h = self.n2(x)
        if self.fused:
            g, u = self.gateup(h).chunk(2, dim=-1)
        else:
            g, u = self.gate(h), self.up(h)
        return x + self.down(F.silu(g) * u)


class Decoder(nn.Module):
    def __init__(self, c: dict, scheme: Scheme | None, batch: int, device: str,
                 variant: str = "plain") -> None:
        super().__init__()
        f = flags(variant)
        self.glue, self.pdl = "glue" in f, "pdl" in f
        self.emb = nn.Embedding(c["vocab"], c["d"], device=device, dtype=torch.bfloat16)
        self.blocks = nn.ModuleList(Block(c, scheme, batch, device, f) for _ in range(c["layers"]))
        self.norm = nn.RMSNorm(c["d"], device=device, dtype=torch.bfloat16)
        self.head = linear(c["d"], c["vocab"], scheme if "head" in f else None, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:         # ids (B,) -> next ids (B,)
        x = self.emb(ids)
        if not self.glue:
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.norm(x)).argmax(-1)
        r = None                                                  # each block's down projection, added late
        for blk in self.blocks:
            r = blk(x, glue.add_rmsnorm(x, r, blk.n1, self.pdl))
        return self.head(glue.add_rmsnorm(x, r, self.norm, self.pdl)).argmax(-1)


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


SCHEMES = {"bf16": None, "W4 g128": Scheme(bits=4, group_size=128),
           "W8 per-channel": Scheme(bits=8, group_size=None, symmetric=True)}


def profile_step(model: Decoder, batch: int, device: str, steps: int = 3) -> dict:
    """CUDA kernel time per eager step, total and the top kernels by name (us per step, launches per step)."""
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(0, model.emb.num_embeddings, (batch,), device=device)
    with torch.no_grad():
        model(ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model(ids)
            torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    ev.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in ev) / steps
    return {"kernel_us_per_step": round(total, 1), "launches_per_step": sum(e.count for e in ev) / steps,
            "top": [(e.key[:90], round(e.self_device_time_total / steps, 1), e.count / steps)
                    for e in ev[:14]]}


def gpu(config: dict = LLAMA3_8B, batches=(1, 16), device: str = "cuda", graph: bool = True,
        variants=("plain",), models=tuple(SCHEMES), kernel_policies=("auto",),
        profile: bool = False) -> list[dict]:
    """Every (variant, model, kernel policy, batch); bf16 runs once per variant (policies are weight-only).
    A forced M = 1 kernel (e.g. triton_gemv1h) is only run at batch 1."""
    import json

    from bitsmith import kernels
    if any("glue" in flags(v) for v in variants):
        print(json.dumps({"glue_check": glue.check(device)}), flush=True)
    rows = []
    for variant in variants:
        for label in models:
            scheme = SCHEMES[label]
            for pol in (("auto",) if scheme is None else kernel_policies):
                for batch in batches:
                    if pol in kernels.M1_KERNELS and batch != 1:
                        continue
                    kernels.set_policy(pol)
                    kernels.set_pdl("pdl" in flags(variant))
                    model = None
                    try:
                        model = Decoder(config, scheme, batch, device, variant)
                        ms = step_ms(model, batch, device, graph)
                        row = {"model": label, "variant": variant, "policy": pol, "batch": batch,
                               "kernel": ["graph" if graph else "eager"], "step_ms": ms,
                               "decode_tokens_per_s": batch * 1e3 / ms}
                        if profile and batch == 1:
                            try:
                                row["profile"] = profile_step(model, batch, device)
                            except Exception as e:           # noqa: BLE001 - the timing stands without it
                                row["profile_error"] = str(e)[:300]
                    except Exception as e:                   # noqa: BLE001 - a failing variant is a result
                        row = {"model": label, "variant": variant, "policy": pol, "batch": batch,
                               "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    finally:
                        kernels.set_policy(None)
                        kernels.set_pdl(None)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    del model
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows
