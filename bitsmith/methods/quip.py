"""`quip`: incoherence processing + GPTQ (QuIP# without its lattice codebooks; Tseng et al. 2024, and
Chee et al., "QuIP: 2-Bit Quantization of Large Language Models With Guarantees", NeurIPS 2023).

Each weight becomes W' = U W V^T with random-sign Hadamards (incoherence.py); its inputs become V x, so the
calibration Hessian becomes V H V^T, and GPTQ (gptq.py, used through its public `quantize`) rounds W' with
that Hessian. The proxy loss is unchanged by the rotation, tr((W - Q) H (W - Q)^T) = tr((W' - Q') H' (W' - Q')^T),
but W' and H' have no outlier entries, so a 2- or 3-bit grid fits every group. The layer runs as
HadamardLinear (y = U^T (W' (V x))), exactly as the data-free `incoherence` method.

With `clip` (default), each group's scale and zero are fixed before the solve by RTN's MSE clipping search on
W' (GPTQ's static groups): min-max ranges waste most of a 2- or 3-bit grid on the tails, and after the
rotation the tails hold no salient weights, so clipping them costs nothing the Hessian cares about.
"""

from __future__ import annotations

import torch

from ..errors import BitsmithError
from ..numerics import float_dtype
from ..primitives import QWeight, check_finite
from ..recipe import Scheme
from . import gptq, rtn
from .incoherence import layer_signs, transform_hessian, transform_weight, with_signs

NEEDS: tuple[str, ...] = ("hessian",)
SEQUENTIAL = True        # as GPTQ: each layer group sees the earlier groups of its block quantized


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, seed: int = 0, damp: float = 0.01,
             block_size: int = 128, act_order: bool = False, static_groups: bool = False, clip: bool = True,
             name: str = "weight", info: dict | None = None) -> QWeight:
    """GPTQ codes of U W V^T under the Hessian V H V^T, with the signs of U and V attached."""
    if weight.dim() != 2:
        raise BitsmithError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_finite(weight, name)
    n, k = weight.shape
    s_in, s_out = layer_signs(k, n, seed, name)
    h = None if stats is None else stats.get("hessian")
    dev = weight.device if h is None else h.device
    s_in, s_out = s_in.to(dev), s_out.to(dev)
    w_t = transform_weight(weight.detach().to(dev, torch.float32), s_in, s_out)        # (N, K)
    stats_t = None if h is None else {"hessian": transform_hessian(h, s_in)}            # (K, K)
    qw = None
    if clip and stats_t is not None and scheme.grid == "int" and not act_order:
        qw = _solve_clipped(w_t, stats_t["hessian"], scheme, damp, block_size, info)
    if qw is None:
        qw = gptq.quantize(w_t, stats_t, scheme, damp=damp, block_size=block_size, act_order=act_order,
                           static_groups=static_groups, name=name, info=info)
    return with_signs(qw, s_in.cpu(), s_out.cpu())


def _solve_clipped(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, damp: float, block_size: int,
                   info: dict | None) -> QWeight | None:
    """GPTQ's solve (gptq.inverse_cholesky + gptq.solve) with static MSE-clipped group parameters; None when
    the Cholesky factorisation fails, leaving the fallbacks to gptq.quantize."""
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0                                       # as gptq.quantize: a dead input is just rounded
    with gptq.one_thread_on_cpu(w.device):
        u, used = gptq.inverse_cholesky(h, damp)
    if u is None:
        return None
    if info is not None:
        info["damp"] = used
    static = rtn.mse_qparams(w, scheme)                                                 # (N, G) each
    with gptq.one_thread_on_cpu(w.device):
        codes, scale, zero = gptq.solve(w, u, scheme, block_size=block_size, static=static)
    return QWeight(codes.to(torch.uint8), scale.to(float_dtype(scheme.scale_dtype)), zero, scheme)
