"""`quip`: incoherence processing + GPTQ (QuIP# without its lattice codebooks; Tseng et al. 2024, and
Chee et al., "QuIP: 2-Bit Quantization of Large Language Models With Guarantees", NeurIPS 2023).

Each weight becomes W' = U W V^T with random-sign Hadamards (incoherence.py); its inputs become V x, so the
calibration Hessian becomes V H V^T, and GPTQ (gptq.py, used through its public `quantize`) rounds W' with
that Hessian. The proxy loss is unchanged by the rotation, tr((W - Q) H (W - Q)^T) = tr((W' - Q') H' (W' - Q')^T),
but W' and H' have no outlier entries, so a 2- or 3-bit grid fits every group. The layer runs as
HadamardLinear (y = U^T (W' (V x))), exactly as the data-free `incoherence` method.

The solver options are GPTQ's, and so are the engine's defaults for them (`scheme_defaults`): act-order at
every width, MSE-clipped group parameters at <= 3 bits (min-max ranges waste most of a 2- or 3-bit grid on
the tails, and after the rotation the tails hold no salient weights), static groups above 3 bits.
`clip` is the older spelling of static MSE-clipped groups (GPTQ's `static_groups` + `mse`).
"""

from __future__ import annotations

import torch

from ..errors import BitsmithError
from ..primitives import QWeight, check_finite
from ..recipe import Scheme
from . import gptq
from .incoherence import layer_signs, transform_hessian, transform_weight, with_signs

NEEDS: tuple[str, ...] = ("hessian",)
SEQUENTIAL = True        # as GPTQ: each layer group sees the earlier groups of its block quantized


def scheme_defaults(scheme: Scheme) -> dict:
    """GPTQ's defaults for this width (gptq.scheme_defaults): on SmolLM2 at 3 bits g64 they beat the
    earlier quip default (static MSE groups in plain column order) as they do for GPTQ alone (README, issue 5)."""
    return gptq.scheme_defaults(scheme)


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, seed: int = 0, damp: float = 0.01,
             block_size: int = 128, act_order: bool = False, static_groups: bool = False, mse: bool = False,
             clip: bool = False, name: str = "weight", info: dict | None = None) -> QWeight:
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
    qw = gptq.quantize(w_t, stats_t, scheme, damp=damp, block_size=block_size, act_order=act_order,
                       static_groups=static_groups or clip, mse=mse or clip, name=name, info=info)
    return with_signs(qw, s_in.cpu(), s_out.cpu())
