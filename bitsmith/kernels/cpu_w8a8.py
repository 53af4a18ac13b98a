"""W8A8 on the CPU: int8 activation codes x int8 weight codes -> exact int32 sums, through fbgemm.

torch's `_int_mm` exists on the CPU but is a naive loop (a 4096x4096 product at M = 1 took 5 s on the AVX2
development box, 400x slower than fp32), so the fast path is fbgemm's
`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`: float codes in (scale 1, zero point 128, so
u8 = q + 128), fp32 out = sum_k (u - 128) w. It takes a weight prepacked once per module.

Exactness: without VNNI, x86 int8 GEMMs multiply u8 x s8 pairs with `vpmaddubsw`, which saturates at
int16: two adjacent products of up to 255 * 127 overflow. The sums are exact when every |w| <= 64
(255 * 64 * 2 < 2^15) or on a CPU with VNNI/AMX (`vpdpbusd` sums into int32). Otherwise the kernel splits the
codes into q+ = max(q, 0) and q- = max(-q, 0) (both <= 127, zero point 0), runs both halves as one product
of 2M rows and subtracts: exact again, at twice the arithmetic. `reduce_range` weights (|w| <= 64, what
PyTorch's fbgemm/x86 qconfigs do to activations instead) keep the single pass on such CPUs.
The oracle is nn.int8_matmul_reference (exact fp32 sums over K-chunks).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

ZP = 128          # u8 = q + 128 for symmetric codes q in [-127, 127]
SAFE_ABS_W = 64   # |w| <= 64: u8 x s8 pair sums fit int16 even for u8 = 255


@functools.lru_cache(maxsize=1)
def has_vnni() -> bool:
    """Whether this CPU sums u8 x s8 products straight into int32 (AVX512-VNNI, AVX-VNNI, AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def missing() -> str | None:
    """Why the fbgemm path cannot run in this torch build, or None."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm engine"
    if not hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"):
        return "torch lacks quantized::linear_with_input_q_dq_qweight_dq_output_fp32"
    return None


@dataclass(frozen=True)
class Pack:
    packed: object            # fbgemm LinearPackedParams holding the int8 codes and per-channel scales
    single_pass: bool         # exact in one pass (VNNI, or every |w| <= 64)


def pack(w8: torch.Tensor, w_scale: torch.Tensor) -> Pack:
    """w8 (N, K) int8 codes, w_scale (N,): the prepacked weight (codes are copied bit for bit)."""
    n = w8.shape[0]
    with warnings.catch_warnings():      # quantized tensors are deprecated in torch; fbgemm still takes them
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(w8.contiguous(), w_scale.double().contiguous(),
                                                      torch.zeros(n, dtype=torch.long), 0)
        with _engine("fbgemm"):
            packed = torch.ops.quantized.linear_prepack(qw, None)
    single = has_vnni() or int(w8.abs().max()) <= SAFE_ABS_W
    return Pack(packed, single)


class _engine:
    """Select the quantized engine for a block (prepack binds the weight to it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        self.saved = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.name

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.saved


def matmul_scaled(q: torch.Tensor, p: Pack) -> torch.Tensor:
    """q (M, K) float holding integer codes in [-127, 127] -> (M, N) float32 = (q @ w8^T) * w_scale."""
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    if p.single_pass:
        return op(q, 1.0, ZP, p.packed)
    m = q.shape[0]
    both = torch.cat([q.clamp(min=0), (-q).clamp(min=0)])                  # (2M, K), each in [0, 127]
    y = op(both, 1.0, 0, p.packed)
    return y[:m] - y[m:]
