"""Which kernel runs a quantized linear here, and why not the others: explicit, inspectable dispatch.

`QuantLinear.forward` asks `select(module, x)` for a kernel name; None means the reference path in nn.py
(dequantize, then F.linear). Every decision can be printed: `explain(module, x)` gives each kernel's verdict
for that input, `available()` what this machine can run at all (`bitsmith env` shows it).

Policy (`BITSMITH_KERNELS`, read per call, or `set_policy`): "auto" (default), "reference" (never use a
kernel), or one kernel name to force where it applies. "auto" on CUDA picks by M = rows of x:
  triton_gemv1p   CUDA-core fused dequant GEMV on packed half2 math, one launch (triton_gemv_h2): M = 1
  triton_gemv1    the fp32 one-launch GEMV: M = 1 where gemv1p cannot run or 8-bit layers under 8M weights
  triton_gemv1h   the fp32 GEMV with half-float code conversion: only when forced
  triton_gemm     tensor-core fused dequant GEMM (operands swapped, split K): M = 2..64
  triton_dequant  Triton dequantize to a dense weight, then cuBLAS: M > 64
  triton_gemv     CUDA-core fused dequant GEMV for several rows of x: only when forced (the GEMM beats it)
and on the CPU, for M <= CPU_MAX_M, the fused dequantize-GEMV that Inductor compiles (cpu_fused.py; needs
a C++ compiler), else torch's int8/int4 weight-only kernels (cpu.py).
`set_pdl(True)` / BITSMITH_PDL=1 (off by default): on Hopper, gemv1p as a programmatic dependent launch, which
pays where the kernels around it are launched the same way (a decode step in a CUDA graph; README).
The rules and launch defaults are the winners of sweeps on an H200 (H100 for gemv and gemv1; README).

Inside a user's torch.compile, `select` returns None: the compiler traces the plain dequantize + linear
(whole graph) and fuses it itself, instead of meeting cached-operand mutation or a compile within its compile.

Kernel operands (re-laid-out scales, CPU packed weights) are built on first use and cached on the module as
non-persistent buffers, so checkpoints keep bitsmith's own format; they are rebuilt if the codes change.
Nothing here imports triton until a GPU kernel is actually chosen.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..packing import unpack
from . import cpu as _cpu
from . import cpu_fused as _fused
from . import layout

POLICIES = ("auto", "reference")
# torch's CPU int kernels beat dequantize-every-call at decode (SmolLM2 W8, M = 1: 2.2x) but lose to it at
# prefill (M = 64: 7x slower), where MKL's float GEMM amortizes the dequantization (AVX2 box, README).
CPU_MAX_M = 8
CPU_AUTO_ORDER = ("cpu_fused", "cpu_int4", "cpu_int8")   # first usable wins
_policy: str | None = None


@dataclass(frozen=True)
class Kernel:
    name: str
    device: str            # "cuda" | "cpu"
    what: str


KERNELS = {k.name: k for k in (
    Kernel("triton_gemv1", "cuda", "W4/W8 A16 fused dequant GEMV, fp16/bf16, M = 1 (one launch)"),
    Kernel("triton_gemv1h", "cuda", "W4/W8 A16 fused dequant GEMV, codes through fp16 halves, M = 1"),
    Kernel("triton_gemv1p", "cuda", "W4/W8 A16 fused dequant GEMV on packed half2 math, M = 1"),
    Kernel("triton_gemv", "cuda", "W4/W8 A16 fused dequant GEMV, fp16/bf16, small M"),
    Kernel("triton_gemm", "cuda", "W4/W8 A16 fused dequant tensor-core GEMM, mid M"),
    Kernel("triton_dequant", "cuda", "Triton dequantize + cuBLAS, large M"),
    Kernel("cpu_fused", "cpu", "W2/W4/W8 fused dequant GEMV compiled by TorchInductor, small M"),
    Kernel("cpu_int8", "cpu", "torch _weight_int8pack_mm, int8 per-channel"),
    Kernel("cpu_int4", "cpu", "torch _weight_int4pack_mm_for_cpu, int4 g32..256"),
    Kernel("w8a8_int8", "cuda", "W8A8 int8 (per-token x per-channel), Triton GEMM + fused epilogue"),
    Kernel("w8a8_intmm", "cuda", "W8A8 int8 via torch._int_mm + Triton epilogue"),
    Kernel("w8a8_fp8", "cuda", "W8A8 FP8 e4m3 via torch._scaled_mm (Hopper+)"),
)}
WEIGHT_ONLY_GPU = ("triton_gemv1", "triton_gemv1h", "triton_gemv1p", "triton_gemv", "triton_gemm",
                   "triton_dequant")
M1_KERNELS = ("triton_gemv1", "triton_gemv1h", "triton_gemv1p")      # take one row of x


def set_policy(policy: str | None) -> None:
    """"auto", "reference", a kernel name, or None to follow $BITSMITH_KERNELS again."""
    if policy is not None and policy not in POLICIES and policy not in KERNELS:
        raise ValueError(f"unknown kernel policy {policy!r}; use one of {POLICIES + tuple(KERNELS)}")
    global _policy
    _policy = policy


def policy() -> str:
    return _policy or os.environ.get("BITSMITH_KERNELS", "auto")


_pdl: bool | None = None


def set_pdl(flag: bool | None) -> None:
    """Launch the M = 1 GEMV (gemv1p) as a programmatic dependent launch where the GPU can (True), never
    (False), or follow $BITSMITH_PDL again (None; "1" = on, default off)."""
    global _pdl
    _pdl = flag


def pdl() -> bool:
    """Whether dispatch asks for programmatic dependent launches (set_pdl, $BITSMITH_PDL). Such a launch lets
    the GPU schedule a GEMV's programs while the kernel before it finishes; they fetch weights ahead and wait
    for it before reading x. It pays where kernels follow each other closely (a decode step in a CUDA
    graph); on its own a launch is no faster (README)."""
    return _pdl if _pdl is not None else os.environ.get("BITSMITH_PDL", "0") == "1"


def _triton_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "triton not installed: pip install 'bitsmith[gpu]'"
    return None


@lru_cache(maxsize=1)
def _machine() -> dict[str, str | None]:
    """What this process can run, fixed once known (devices, packages and torch ops do not come and go).
    Cached because `select` asks on every forward: rebuilding it cost ~10 us a call, a fifth of a
    SmolLM2 layer's decode time on the CPU."""
    out = {}
    cuda = _triton_reason()
    for name, k in KERNELS.items():
        if name == "cpu_fused":
            out[name] = _fused.missing()
        elif k.device == "cpu":
            out[name] = _cpu.missing_ops()[name]
        elif cuda is not None:
            out[name] = cuda
        elif name == "w8a8_intmm" and not hasattr(torch, "_int_mm"):
            out[name] = "torch lacks _int_mm"
        elif name == "w8a8_fp8" and torch.cuda.get_device_capability() < (8, 9):
            out[name] = "FP8 needs compute capability 8.9+ (Ada/Hopper)"
        else:
            out[name] = None
    return out


def _usable(name: str) -> str | None:
    """None if kernel `name` can run on this machine now, else why not (cpu_fused can fail to compile)."""
    return _fused.usable() if name == "cpu_fused" else _machine()[name]


def available() -> dict[str, str | None]:
    """{kernel: None if usable on this machine, else why not}."""
    return {name: _usable(name) for name in KERNELS}


def _layer_reason(module, name: str) -> str | None:
    """Why kernel `name` cannot run this module's weight format (None when it can); cached per module."""
    cache = module.__dict__.setdefault("_kernel_reasons", {})
    if name not in cache:
        before = getattr(module, "BEFORE_KERNEL", ())     # applied to x by the module itself (AWQ's 1/s)
        spec = {t: v for t, v in module.transform_spec.items() if t not in before}
        if name in WEIGHT_ONLY_GPU:
            cache[name] = layout.unsupported_reason(module.n, module.k, module.scheme, module.zero_kind, spec)
            if name == "triton_gemv1p" and cache[name] is None:
                cache[name] = _gemv1p_reason(module)
        elif name == "cpu_fused":
            cache[name] = _fused.unsupported_reason(module.n, module.k, module.scheme, spec)
        elif name in ("cpu_int8", "cpu_int4"):
            cache[name] = _cpu.unsupported_reason(name, module.n, module.k, module.scheme, spec)
        else:
            cache[name] = "W8A8 kernels quantize activations; weight-only QuantLinear does not"
    return cache[name]


def _gemv1p_reason(module) -> str | None:
    """triton_gemv_h2.unsupported, from the module's format (without building its operands)."""
    return layout.gemv1p_reason(module.k, module.scheme.bits, layout.kernel_group(module.k, module.scheme),
                                module.zero_kind in ("none", "packed"))


def explain(module, x: torch.Tensor) -> dict[str, str]:
    """Each kernel's verdict for this module and input: "chosen", "usable", or why not."""
    chosen = select(module, x)
    out = {}
    avail = available()
    m = x.numel() // max(x.shape[-1], 1)
    for name, k in KERNELS.items():
        why = avail[name] or _layer_reason(module, name)
        if why is None and k.device != x.device.type:
            why = f"input is on {x.device.type}"
        if why is None and name != chosen:
            why = f"usable, not picked for M={m}, {x.dtype} under policy {policy()!r}"
        out[name] = why or "chosen"
    if chosen is None:
        out["reference"] = "chosen"
    return out


def _auto(module, x: torch.Tensor) -> str | None:
    dev = x.device.type
    if dev == "cuda":
        if x.dtype not in (torch.float16, torch.bfloat16) or _machine()["triton_gemv1"] is not None:
            return None                           # (the cached verdict: _triton_reason() asks CUDA and importlib)
        name = weight_only_choice(x.numel() // module.k, module.n, module.k, module.scheme.bits)
        if name == "triton_gemv1p" and _layer_reason(module, name) is not None:
            name = "triton_gemv1"
        return name if _layer_reason(module, name) is None else None
    if dev == "cpu" and x.numel() // module.k <= CPU_MAX_M:
        for name in CPU_AUTO_ORDER:
            if _usable(name) is None and _layer_reason(module, name) is None:
                return name
    return None


def weight_only_choice(m: int, n: int, k: int, bits: int = 4) -> str:
    """GPU weight-only kernel for an (M, K) x (N, K) product. From the H200 runs (README): at M = 1 the
    packed-half2 GEMV (1.0-1.4x faster than gemv1 on the nine shapes swept, 4 and 8 bits), except 8-bit
    layers under 8M weights, where gemv1 was faster (1024x4096: 5.1 vs 5.9 us); the swapped tensor-core
    GEMM from M = 2 to 64 on every shape (the CUDA-core multi-row GEMV never wins any more), and at 4 bits
    up to M = 256 on layers of >= 2^25 weights (session 9, sweep-kperm-fine.json: its kperm launch at
    M = 256 243 / 276 / 72 / 83 us on 28672x8192 / 8192x28672 / 14336x4096 / 4096x14336 against 359 / 341
    / 87 / 91 for dequantize + cuBLAS; 4096x4096 32 against 26); above, a dense dequantize + cuBLAS (the
    GEMM at M = 2048: 1887 against 1547 us on 28672x8192).
    Where gemv1p cannot run a layer (fractional zeros, ragged 4-word units) dispatch takes gemv1."""
    if m == 1:
        return "triton_gemv1" if bits == 8 and n * k < 2**23 else "triton_gemv1p"
    if m <= 64 or m <= 256 and bits == 4 and n * k >= 2**25:
        return "triton_gemm"
    return "triton_dequant"


def select(module, x: torch.Tensor) -> str | None:
    """The kernel that runs `module` on `x` under the current policy, or None for the reference path."""
    if torch.compiler.is_compiling():
        return None       # inside a user's torch.compile: the plain dequantize + linear, for its compiler to fuse
    pol = policy()
    if pol == "reference" or torch.is_grad_enabled() and x.requires_grad:
        return None                               # kernels have no backward; autograd uses the reference
    if pol == "auto":
        return _auto(module, x)
    k = KERNELS.get(pol)
    if k is None or k.device != x.device.type or _usable(pol) or _layer_reason(module, pol) is not None:
        return None
    if pol in M1_KERNELS and x.numel() != module.k:
        return None                               # the one-launch GEMVs take one row of x
    if k.device == "cuda" and x.dtype not in (torch.float16, torch.bfloat16):
        return None
    return pol


# ---- operands cached on the module -------------------------------------------------------------------
def _key(module) -> tuple:
    s = module.scale
    return (module.qcodes.device, module.qcodes.data_ptr(), module.qcodes._version, s.data_ptr(), s._version)


def _unpacked_zero(module) -> torch.Tensor | None:
    """(N, G) float zero points (None when symmetric), without unpacking the codes."""
    if module.zero_kind == "packed":
        return unpack(module.qzero, module.scheme.bits, module.n_groups).float()
    return module.zero.float() if module.zero_kind in ("float16", "float32") else None


def operands(module, name: str):
    """The kernel-layout operands of `module` for kernel `name`, built once and cached (non-persistent
    buffers named _kernel_*; a changed qcodes/scale tensor triggers a rebuild)."""
    family = "gpu" if name in WEIGHT_ONLY_GPU else name
    cache = module.__dict__.setdefault("_kernel_packs", {})
    key = _key(module)
    hit = cache.get(family)
    if hit is not None and hit[0] == key:
        return hit[1]
    perm = getattr(module, "perm", None)
    if family == "gpu":
        pack = layout.build(module.qcodes, module.scale, _unpacked_zero(module), perm, module.scheme, module.n,
                            module.k)
        tensors = {"scale": pack.scale, "zero": pack.zero, "xidx": pack.xidx}
    else:
        qw = module.qweight()
        if family == "cpu_fused":
            pack = _fused.build(qw.codes, qw.scale, qw.zero, perm, module.scheme, module.k)
            tensors = {"w": pack.w, "scale": pack.scale, "zs": pack.zs}
        else:
            pack = _cpu.build(qw.codes, qw.scale, qw.zero, perm, module.scheme, module.k)
            tensors = {"w": pack.w, "scale": pack.scale, "zcorr": pack.zcorr}
    for t_name, t in tensors.items():
        if t is not None:
            module.register_buffer(f"_kernel_{family}_{t_name}", t, persistent=False)
    cache[family] = (key, pack)
    return pack


def run(module, x: torch.Tensor, name: str) -> torch.Tensor:
    """y = module(x) through kernel `name` (as chosen by `select`)."""
    x2 = x.reshape(-1, module.k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    bias = module.bias
    pack = operands(module, name)
    if name in WEIGHT_ONLY_GPU:
        from . import triton_gemm, triton_gemv1, triton_wq
        bias = None if bias is None else bias.to(x.dtype)
        m = x2.shape[0]
        if name == "triton_gemv1p" and m == 1:
            from . import triton_gemv_h2
            cfg = _tma_checked(gemv1p_config(module.n, module.k, module.scheme.bits), x2, pack)
            if pdl() and _pdl_ok(x2.device):
                # the next kernel scheduled after each program's K loop: scheduling it at the start slowed the
                # 8B decode step 25-35%; 0, 2 or 4 steps prefetched to L2 measured the same (README)
                cfg = {**cfg, "pdl": True, "prefetch": 2, "pdl_trigger": "late"}
            y = triton_gemv_h2.gemv1p(x2, pack, bias, **cfg)
        elif name == "triton_gemv1h" and m == 1:
            y = triton_gemv1.gemv1h(x2, pack, bias, **gemv1h_config(module.n, module.k, module.scheme.bits))
        elif name == "triton_gemv1" and m == 1:
            y = triton_gemv1.gemv1(x2, pack, bias, **gemv1_config(module.n, module.k, module.scheme.bits))
        elif name in ("triton_gemv",) + M1_KERNELS:
            y = triton_wq.gemv(x2, pack, bias, **gemv_config(m, module.n, module.k))
        elif name == "triton_gemm":
            cfg = _tma_checked(gemm_config(m, module.n, module.k, module.scheme.bits), x2, pack)
            if cfg.get("scale_after") and not triton_wq.steps_in_group(pack, cfg["block_w"]):
                cfg = {**cfg, "scale_after": False}       # K steps wider than a group (g32, g64)
            if cfg.get("kperm") and not triton_gemm.kperm_ok(pack, cfg["block_w"], cfg["kperm"]):
                cfg = {**cfg, "kperm": 0}                 # fractional zeros, 8 bits, K not a multiple of 128
            y = triton_gemm.gemm(x2, pack, bias, **cfg)
        else:
            y = triton_gemm.dequant_matmul(x2, pack, bias)
    elif name == "cpu_fused":
        y = _fused.linear(x2, pack, bias)
    else:
        y = _cpu.linear(x2, pack, bias)
    return y.view(*x.shape[:-1], module.n)


def _pdl_ok(device: torch.device) -> bool:
    from . import triton_wq
    return triton_wq.pdl_reason(device) is None


def _tma_checked(cfg: dict, x2: torch.Tensor, pack) -> dict:
    """A launch config that asks for the copy engine (tma) without it where this GPU or layer cannot
    (triton_wq.tma_reason, asked once per pack and activation width): the same kernel on pointer loads."""
    if not cfg.get("tma"):
        return cfg
    key = ("reason", x2.element_size())
    if key not in pack.tma:
        from . import triton_wq
        pack.tma[key] = triton_wq.tma_reason(x2, pack)
    return cfg if pack.tma[key] is None else {**cfg, "tma": False}


TUNED: dict[tuple[str, int, int, int], dict] = {}   # (kernel, N, K, M bucket) -> launch config (benchmarks)


def m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def gemv_config(m: int, n: int, k: int) -> dict:
    """GEMV launch. Tuned on an H100 (benchmarks/kernels.py --tune): 16 channels per program, 4 warps; split K
    until there are ~2048 programs unless N alone gives >= 768; 8 groups per K step on long rows."""
    if ("triton_gemv", n, k, m_bucket(m)) in TUNED:
        return TUNED["triton_gemv", n, k, m_bucket(m)]
    block_n = 16
    progs = -(-n // block_n)
    split = 1
    if progs < 768:
        while progs * split < 2048 and k // (2 * split) >= 512:
            split *= 2
    groups_per_split = k // 128 // split
    return {"block_n": block_n, "block_g": 8 if groups_per_split >= 48 else 4, "split_k": split, "num_warps": 4}


def gemv1_config(n: int, k: int, bits: int = 4) -> dict:
    """One-launch GEMV, the rule behind the H100 sweep's winners (README): 4 warps, 2 groups per step;
    64 rows per program at 4 bits, 32 at 8; K split in powers of two while
    each program keeps >= 4 groups of 128 while there are <= 2048 programs (at most 16 splits).
    (TUNED winners override it.)"""
    if ("triton_gemv1", n, k, 1) in TUNED:
        return TUNED["triton_gemv1", n, k, 1]
    block_n = 64 if bits == 4 else 32
    progs, groups, split = -(-n // block_n), max(1, k // 128), 1
    while split < 16 and groups // (2 * split) >= 4 and progs * split <= 2048:
        split *= 2
    return {"block_n": block_n, "block_g": 2, "split_k": split, "num_warps": 4}


def gemv1h_config(n: int, k: int, bits: int = 4) -> dict:
    """Launch of triton_gemv1.gemv1h (only when forced: dispatch takes gemv1p at M = 1; README). 4 bits: 64 rows
    per program on one warp (8 rows per thread; the winner of the H200 sweep, sweep-m1.json, where a one-warp
    program also skips the cross-warp barriers of the scale loads), K split in powers of two until >= 1024
    programs; 8 bits: 128 rows over 4 warps, >= 264 programs (2 per SM). Each split keeps >= 4 K steps; fewer
    rows when N is small. (TUNED winners override it.)"""
    if ("triton_gemv1h", n, k, 1) in TUNED:
        return TUNED["triton_gemv1h", n, k, 1]
    block_n, warps, target = (64, 1, 1024) if bits == 4 else (128, 4, 264)
    while block_n > 32 and -(-n // block_n) < 16:
        block_n //= 2
    block_w = 16 if bits == 4 else 32
    steps = max(1, k * bits // 32 // block_w)
    progs, split = -(-n // block_n), 1
    while split < 16 and progs * split < target and steps // (2 * split) >= 4:
        split *= 2
    return {"block_n": block_n, "block_w": block_w, "split_k": split, "num_warps": warps}


def gemv1p_config(n: int, k: int, bits: int = 4) -> dict:
    """Launch of triton_gemv_h2.gemv1p, the H200 sweeps' winners as a rule (sweep-m1-all-p.json,
    sweep-m1-all-pipe.json): 64 rows on one warp (8 rows per thread share the x conversion), 32 words per K
    step (two g128 groups at 4 bits), the next step's words in registers, K split in powers of two until
    >= 768 programs while each split keeps >= 2 steps. Where 64 rows cannot reach 768 programs (small N
    and K): 32 rows and 16-word steps, split the same way (at most 16).
    4 bits (session 7, sweep-tma.json, sweep-tma2.json): 16-word steps fetched by the copy engine (TMA)
    3 deep, split to >= 768 programs keeping >= 4 steps, wherever that gives >= 512 programs: 38.2 / 36.9 us
    on 28672x8192 / 8192x28672 against 48.6 / 44.1 for the register-prefetch launch above, 7.1 against 7.7
    on 4096x4096, and equal (13.4) on the mid shapes, where the cp.async pipeline had won before. 8 bits:
    the copy engine was within 1-3% either way, so the launch above stays. (TUNED winners override it.)"""
    if ("triton_gemv1p", n, k, 1) in TUNED:
        return TUNED["triton_gemv1p", n, k, 1]

    def split_for(block_n: int, block_w: int, min_steps: int) -> tuple[int, int, int]:
        progs, steps, split = -(-n // block_n), max(1, words // block_w), 1
        while split < 16 and progs * split < 768 and steps // (2 * split) >= min_steps:
            split *= 2
        return split, progs * split, steps // split

    words = k * bits // 32
    if bits == 4:
        split, progs, _ = split_for(64, 16, 4)
        if progs >= 512:
            return {"block_n": 64, "block_w": 16, "split_k": split, "num_warps": 1, "pipe": 3, "tma": True}
    split, progs, _ = split_for(64, 32, 2)
    if progs >= 768:
        return {"block_n": 64, "block_w": 32, "split_k": split, "num_warps": 1}
    split, _, _ = split_for(32, 16, 2)
    return {"block_n": 32, "block_w": 16, "split_k": split, "num_warps": 1}


def gemm_config(m: int, n: int, k: int, bits: int = 4) -> dict:
    """GEMM launch, the H200 sweeps' winners (README): 16 rows of x per program up to M = 16 (64 weight
    rows, 4 warps), 64 (128 weight rows) up to M = 64; K split in powers of two until there are >= 1024
    programs at M <= 16 (>= 256 up to M = 64) while each split keeps >= 4 groups of 128. Above M = 64
    128 or 256 rows, 8 warps, no split; 8-bit stays at 128 rows (256 needs more shared memory than the
    H200's 227 KB at 3 stages).
    4 bits, session 7 (sweep-tma2.json): x and word tiles through the copy engine (tma), 3 stages. At
    M = 17-64 with 8 warps: 130.1 / 112.9 us on 28672x8192 / 8192x28672 against 186.9 / 161.7 for the
    pointer-load launch, 43.4 / 37.0 against 57.3 / 50.8 on the mid shapes. At M <= 16 only on layers of
    >= 2^27 weights (4% faster there, 2-3% slower on the mid shapes). Above M = 64: 256 rows, where
    dispatch takes the GEMM at all (weight_only_choice). 8 bits: not measured with the copy engine, so
    pointer loads.
    4 bits, session 8 (sweep-sa.json, M = 2 / 16 / 64 on the five shapes): splits as the comment below
    says (14336x4096 at M = 16: 24.5 against 27.5 us; 28672x8192 at M = 64: 121.4 against 128.6), and
    scale_after on the 4096-row layers at M <= 16 (4096x14336 at M = 16: 25.8 against 28.4) and on
    launches of <= 2 splits at M = 17-64 (28672x8192: 114.7 against 121.4); it lost 15-40% elsewhere.
    4 bits, session 9 (sweep-kperm*.json): kperm, the K order in which the dequantized pairs are the MMA's
    fragments (triton_gemm.gemm). At M <= 16 kperm = 1 (x permuted per tile) through the copy engine on
    every shape, 64 weight rows, 3 stages, the split rule above, scale_after on layers of <= 8192 rows: M = 16
    54.9 / 62.3 / 18.7 / 19.3 / 9.6 us on 28672x8192 / 8192x28672 / 14336x4096 / 4096x14336 / 4096x4096
    against 75.5 / 74.5 / 24.4 / 25.7 / 11.5 for the session-8 rule. At M = 17-64 kperm = 2 (x permuted
    once per call) with scale_after where the split is <= 2 (28672x8192: 83.2 against 115.5; 14336x4096:
    31.8 against 36.7); with more splits it lost (8192x28672 at split 4: 130.2 against 112.2), so none
    there. At M = 65-256 kperm = 2 at 128 x 128 tiles, 8 warps, split 2 where that leaves <= 128 tiles.
    (TUNED winners override it.)"""
    if ("triton_gemm", n, k, m_bucket(m)) in TUNED:
        return TUNED["triton_gemm", n, k, m_bucket(m)]
    block_w = 16 if bits == 4 else 32
    if m <= 16:
        block_m, block_n, warps, target = 16, 64, 4, 1024
        tma = bits == 4
    elif m <= 64:
        block_m, block_n, warps, target = 64, 128, 8 if bits == 4 else 4, 256
        tma = bits == 4
    else:
        block_m, block_n, warps, target = 128, 128, 8, 1
        tma = bits == 4
    tiles = -(-m // block_m) * -(-n // block_n)
    groups, split, scale_after, kperm = k // 128, 1, False, 0
    if bits == 4 and m <= 64:
        # session 8 (sweep-sa.json): the largest split that keeps the grid within `target` programs and
        # each split >= 8 groups (M <= 16; >= 4 above), and at M <= 16 at least 512 programs while splits
        # keep 4 groups; scale_after (the scales on each step's product) where it won, 4-11%
        lo = 8 if m <= 16 else 4
        while tiles * split * 2 <= target and groups // (2 * split) >= lo:
            split *= 2
        while m <= 16 and tiles * split < 512 and groups // (2 * split) >= 4:
            split *= 2
        scale_after = n <= 8192 if m <= 16 else split <= 2
        kperm = 1 if m <= 16 else 2 if split <= 2 else 0
    else:
        while tiles * split < target and groups // (2 * split) >= 4:
            split *= 2
        if bits == 4:
            kperm, split = 2, 2 if tiles <= 128 and groups >= 8 else 1
    cfg = {"block_m": block_m, "block_n": block_n, "split_k": split, "num_warps": warps, "num_stages": 3,
           "block_w": block_w, "tma": tma}
    if scale_after:
        cfg["scale_after"] = True
    if kperm:
        cfg["kperm"] = kperm
    return cfg
