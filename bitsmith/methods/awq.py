"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024), after llm-awq / AutoAWQ.

Layers that read one input (q/k/v, gate/up) share a per-input-channel scale s: the weights become W diag(s)
and the input X diag(1/s), so salient channels (large mean |x|) get finer steps. s = mean|x|^a (or, "duo",
mean|x|^a / mean|w|^(1-a)) with a chosen on a grid to minimise the group's output error on calibration
data, tr((W - Q(W s)/s) H (W - Q(W s)/s)^T) with H = X^T X / T (so it sees every calibration token;
s = 1, plain RTN, is a candidate, so the search never loses to it). 1/s is folded into the operation that
produced X: a norm found by tracing the block, or the linear named by LINEAR_FOLDS; each fold is checked
on the block's output and undone if it changes it. Where no fold holds (o_proj when v_proj has fewer
outputs, GQA), 1/s becomes a run-time input scale (QWeight.transform["input_scale"], applied by
nn.InputScaledLinear): the float layer is left as it is and `quantize` scales the weight itself. Finally
each weight's group ranges are shrunk (clipping search) to minimise the same output error per group.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

from ..primitives import (
    QWeight,
    dequantize_weight,
    group_size_for,
    quantize_weight,
    symmetric_zero,
    to_groups,
    weight_qparams,
)
from ..recipe import Scheme

log = logging.getLogger(__name__)

NEEDS: tuple[str, ...] = ("hessian", "act_absmean")
SEQUENTIAL = False        # scales are searched on the float block, all folds done before any layer is quantized
# layer name -> the sibling linear whose output rows can absorb 1/s (attention's v before o, up before down)
LINEAR_FOLDS = {"o_proj": "v_proj", "out_proj": "v_proj", "down_proj": "up_proj", "fc2": "fc1",
                "dense_4h_to_h": "dense_h_to_4h"}


def quantize(weight: torch.Tensor, stats: dict | None, scheme: Scheme, *, clip: bool = True,
             clip_grid: int = 20, max_shrink: float = 0.5, name: str = "weight",
             info: dict | None = None) -> QWeight:
    """Quantize a weight (N, K), already scaled when its scale was folded; with a run-time scale
    (stats["input_scale"] = 1/s) the codes describe W diag(s). With `clip`, per-group ranges minimise
    the output error."""
    h = None if stats is None else stats.get("hessian")
    runtime = None if stats is None else stats.get("input_scale")
    if runtime is not None:
        s = 1.0 / runtime.to(weight.device, torch.float32)
        weight = weight.float() * s
        h = None if h is None else h / torch.outer(s, s).to(h.device)
    if not clip or h is None or scheme.grid != "int":
        qw = quantize_weight(weight, scheme, name=name)
    else:
        scale, zero, shrink = clip_qparams(weight.to(h.device), h, scheme, grid=clip_grid, max_shrink=max_shrink)
        qw = quantize_weight(weight, scheme, scale=scale.to(weight.device),
                             zero=None if zero is None else zero.to(weight.device), name=name)
        if info is not None:
            info["awq_clip_mean_shrink"] = round(float(shrink.mean()), 4)
    if runtime is not None:
        qw = dataclasses.replace(qw, transform={"input_scale": runtime.to(weight.device, torch.float32)})
    return qw


# ---- scale search ---------------------------------------------------------------------------------------
def search_scale(w: torch.Tensor, h: torch.Tensor, x_mean: torch.Tensor, scheme: Scheme, *, n_grid: int = 20,
                 duo_scaling: bool = True) -> tuple[torch.Tensor | None, str, float]:
    """Best per-input-channel scale for the stacked weights w (N, K) of one group. Returns (s (K,) or None
    when s = 1 wins, a label of the winner, loss / RTN loss)."""
    w = w.to(h.device, torch.float32)
    x_mean = x_mean.to(h.device).float()
    factor = loss_factor(h)                     # once per group: each candidate then costs half a product
    base = output_loss(w, torch.ones_like(x_mean), h, scheme, factor)
    best, best_loss, label = None, base, "none"
    w_mean = _weight_mean(w, scheme)
    for i in range(1, n_grid):
        a = i / n_grid
        cands = [("x", x_mean.pow(a))]
        if duo_scaling:
            cands.append(("duo", x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)))
        for kind, s in cands:
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            loss = output_loss(w, s, h, scheme, factor)
            if loss < best_loss:
                best, best_loss, label = s, loss, f"{kind}^{a:.2f}"
    return best, label, float(best_loss / base) if base > 0 else 1.0


def output_loss(w: torch.Tensor, s: torch.Tensor, h: torch.Tensor, scheme: Scheme,
                factor: torch.Tensor | None = None) -> float:
    """tr(D H D^T), D = w - Q(w diag(s)) diag(1/s): the summed squared output error per token. With
    `factor` (L from `loss_factor`), computed as ||D L||^2."""
    dq = fake_quant(w * s, scheme) / s                                          # (N, K)
    d = w - dq
    if factor is None:
        return float(((d @ h) * d).sum())
    return quadratic_form(d, factor)


LOSS_TILE = 128


def fake_quant(w: torch.Tensor, scheme: Scheme, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize_weight(quantize_weight(w, scheme, scale=, zero=)) for an int grid, the same arithmetic
    without building a QWeight (no uint8 codes, one padding): the searches call it dozens of times."""
    if scheme.grid != "int":
        return dequantize_weight(quantize_weight(w, scheme, scale=scale, zero=zero))
    n, k = w.shape
    g = group_size_for(k, scheme.group_size)
    if scale is None:
        scale, zero = weight_qparams(w, scheme)
    s3 = scale.float().unsqueeze(-1)                                            # (N, G, 1)
    z3 = symmetric_zero(scheme) if zero is None else zero.float().unsqueeze(-1)
    q = torch.clamp(torch.round(to_groups(w.float(), g) / s3) + z3, 0, (1 << scheme.bits) - 1)
    return ((q - z3) * s3).view(n, -1)[:, :k]


def loss_factor(h: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor L of H = L L^T (so tr(D H D^T) = ||D L||_F^2), or None when H is not
    positive definite (then the plain product is used)."""
    l, bad = torch.linalg.cholesky_ex(h.float())
    return l if int(bad) == 0 and bool(torch.isfinite(l).all()) else None


def quadratic_form(d: torch.Tensor, l: torch.Tensor) -> float:
    """||D L||_F^2 for lower-triangular L, tile by tile of L's columns: the zero upper part is skipped, so
    the cost is about half of D H's (N K^2) in GEMMs that still run at full speed."""
    k = d.shape[1]
    total = 0.0
    for a in range(0, k, LOSS_TILE):
        b = min(a + LOSS_TILE, k)
        total += float((d[:, a:] @ l[a:, a:b]).square().sum())
    return total


def _weight_mean(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Mean over rows of |w| normalised by its group's max |w|. (K,)"""
    n, k = w.shape
    g = group_size_for(k, scheme.group_size)
    wg = to_groups(w.abs(), g)                                                  # (N, G, g)
    wg = wg / wg.amax(-1, keepdim=True).clamp(min=1e-12)
    return wg.reshape(n, -1)[:, :k].mean(0)


# ---- clipping search ------------------------------------------------------------------------------------
def clip_qparams(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, *, grid: int = 20, max_shrink: float = 0.5
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-group (scale, zero) over ranges shrunk by 1, 1 - 1/grid, ... > 1 - max_shrink, each group
    keeping the one with the least output error d^T H_gg d (H_gg: the group's diagonal block of H).
    Returns scale, zero and the chosen shrink factors, all (N, G)."""
    w = w.float()
    k = w.shape[1]
    g = group_size_for(k, scheme.group_size)
    hb = diag_blocks(h.float(), g)                                              # (G, g, g)
    best_s, best_z = weight_qparams(w, scheme)
    best_err = torch.full(best_s.shape, float("inf"), device=w.device)
    best_shrink = torch.ones(best_s.shape, device=w.device)
    for i in range(max(1, round(max_shrink * grid))):
        shrink = 1.0 - i / grid
        s, z = weight_qparams(w, scheme, shrink)
        dq = fake_quant(w, scheme, s, z)
        d = to_groups(dq - w, g).transpose(0, 1)                               # (G, N, g)
        err = (torch.bmm(d, hb) * d).sum(-1).T                                  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s.float(), best_s.float())
        if z is not None:
            best_z = torch.where(better, z, best_z)
        best_shrink = torch.where(better, torch.full_like(best_shrink, shrink), best_shrink)
    return best_s, best_z, best_shrink


def diag_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """The diagonal (g, g) blocks of H (K, K), the ragged last one zero-padded. (G, g, g)"""
    k = h.shape[0]
    p = (-k) % g
    hp = torch.nn.functional.pad(h, (0, p, 0, p))
    groups = (k + p) // g
    return torch.diagonal(hp.view(groups, g, groups, g), dim1=0, dim2=2).permute(2, 0, 1)


# ---- scaling a float block ------------------------------------------------------------------------------
def transform_block(block: nn.Module, groups: list, mods: dict[str, nn.Module], stats: dict[str, dict | None],
                    scheme: Scheme, *, probe: Callable[[], torch.Tensor], runtime_scale: bool = False,
                    info: dict[str, dict] | None = None, n_grid: int = 20, duo_scaling: bool = True,
                    fold_tol: float | None = None) -> dict[str, dict | None]:
    """Search each group's scale and apply it to the float block, output-preserving. Returns the stats of
    the scaled inputs (H / (s s^T), mean|x| / s) per layer."""
    info = info if info is not None else {}
    stats = dict(stats)
    ref = probe()
    tol = fold_tol if fold_tol is not None else (1e-3 if ref.dtype == torch.float32 else 2e-2)
    for g in groups:
        first = stats.get(g.names[0])
        linears = [mods[n] for n in g.names]
        if first is None or not all(isinstance(m, nn.Linear) for m in linears):
            continue
        w = torch.cat([m.weight.detach() for m in linears])                     # (sum N, K)
        s, label, ratio = search_scale(w, first["hessian"], first["act_absmean"], scheme, n_grid=n_grid,
                                       duo_scaling=duo_scaling)
        how = "none"
        if s is not None:
            how = _apply(block, g, mods, s, probe, ref, tol, runtime_scale)
        for n in g.names:
            info.setdefault(n, {}).update(awq_scale=label if how != "none" else "none", awq_fold=how,
                                          awq_loss_vs_rtn=round(ratio, 4))
        if how == "none":
            continue
        s = s.to(first["hessian"].device)
        if how == "runtime":           # the float layers stay as they are: quantize() scales the weights
            scaled = {**first, "input_scale": 1.0 / s}
        else:
            scaled = {"hessian": first["hessian"] / torch.outer(s, s), "act_absmean": first["act_absmean"] / s}
        for n in g.names:
            stats[n] = scaled
    return stats


def _apply(block: nn.Module, g, mods: dict[str, nn.Module], s: torch.Tensor, probe: Callable[[], torch.Tensor],
           ref: torch.Tensor, tol: float, runtime_scale: bool, who: str = "AWQ") -> str:
    """Scale the group's weights by s and fold 1/s into its producer; 'fold:<name>', 'runtime' or 'none'.
    `who` names the method in the log (SmoothQuant folds its scales through here too)."""
    for target_name in _fold_candidates(block, g, mods):
        target = block.get_submodule(target_name)
        saved = _snapshot([target, *(mods[n] for n in g.names)])
        _scale_inputs([mods[n] for n in g.names], s)
        _scale_outputs(target, 1.0 / s)
        err = _rel_diff(probe(), ref)
        if err <= tol:
            return f"fold:{target_name}"
        _restore(saved)
        log.info("%s: folding into %s changes the block output (rel. %.2g); not folding %s", who, target_name,
                 err, ", ".join(g.names))
    if runtime_scale:
        return "runtime"
    log.info("%s: no fold target for %s and no runtime input scale; keeping s = 1", who, ", ".join(g.names))
    return "none"


def _fold_candidates(block: nn.Module, g, mods: dict[str, nn.Module]) -> list[str]:
    """Where 1/s may go: the norm that produced the group's input, else the sibling named by LINEAR_FOLDS."""
    out = [g.source] if g.source is not None else []
    for n in g.names:
        parent, _, leaf = n.rpartition(".")
        if leaf in LINEAR_FOLDS:
            sib = f"{parent}.{LINEAR_FOLDS[leaf]}" if parent else LINEAR_FOLDS[leaf]
            try:
                m = block.get_submodule(sib)
            except AttributeError:
                continue
            k = mods[n].weight.shape[1]
            if isinstance(m, nn.Linear) and m.out_features == k and sib not in out:
                out.append(sib)
    return out


def _scale_inputs(linears: list[nn.Module], s: torch.Tensor) -> None:
    for m in linears:
        m.weight.data.mul_(s.to(m.weight.device, m.weight.dtype))


def _scale_outputs(m: nn.Module, r: torch.Tensor) -> None:
    """Multiply the module's outputs by r per channel: a norm's weight and bias, a linear's rows."""
    r = r.to(m.weight.device, m.weight.dtype)
    m.weight.data.mul_(r.view(-1, *([1] * (m.weight.dim() - 1))))
    if getattr(m, "bias", None) is not None:
        m.bias.data.mul_(r)


def _snapshot(mods: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(p, p.data.clone()) for m in mods for p in m.parameters(recurse=False)]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, data in saved:
        p.data.copy_(data)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
