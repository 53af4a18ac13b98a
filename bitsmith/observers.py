"""Streaming statistics of a layer's inputs, one calibration batch at a time, in float32.

A layer's inputs are first flattened to rows of features (`features`): a Linear's (..., K) becomes (T, K);
a Conv2d's input is unfolded into its patches, (B * L, C * kh * kw), the layout of its flattened weight.
Observers keep running means, so the result does not depend on how the data was batched:
  "hessian"      H = mean_t x_t x_t^T  (K, K): the second moment that GPTQ's proxy loss and AWQ's
                 output error ||X W^T - X Q^T||^2 / T = tr((W - Q) H (W - Q)^T) are built on
  "act_absmean"  mean_t |x_t|  (K,): AWQ's per-input-channel activation magnitude
  "act_minmax"   running min / max (per tensor, or per channel with per_channel=True)
  "act_channel_absmax"  max_t |x_t| (K,): SmoothQuant's per-channel activation range
  "act_hist"     min / max, a moving average of per-batch min / max, and a histogram of |x| from which
                 `clip_range` picks a static activation range: "minmax", "ema", "percentile", "mse"
                 (least expected squared error), "entropy" (least KL divergence, TensorRT's calibrator)
Methods name what they need in `NEEDS`; `make_observers` builds exactly those. Per-channel versions of the
clipping rules work on a (C, T) sample matrix (`clip_per_channel`); per-token ranges are taken at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BitsmithError


class SecondMoment:
    """Running mean of x x^T over rows. (K, K)

    x^T x is symmetric: for K >= 2 * TILE only the tiles on and above the diagonal are computed (a
    symmetric rank-k update in GEMM-sized pieces: 4 tiles of 6 cost 21/36 of the full product) and
    `result` mirrors them. The tiles are large enough that each GEMM still runs at full speed."""

    TILE = 256

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.count = 0
        n = -(-k // self.TILE) if k >= 2 * self.TILE else 1
        edges = [round(i * k / n) for i in range(n + 1)]                 # n near-equal tiles
        self.tiles = list(zip(edges[:-1], edges[1:]))
        self.mirrored = True

    def update(self, x: torch.Tensor) -> None:            # x: (T, K)
        x = x.to(self.mean.device, torch.float32)
        t = x.shape[0]
        if t == 0:
            return
        total = self.count + t
        # Rescale the old mean instead of summing: the magnitude stays O(x^2) for any number of tokens.
        if len(self.tiles) == 1:
            self.mean.mul_(self.count / total).addmm_(x.T, x, alpha=1.0 / total)
        else:
            xt = x.T
            for a, b in self.tiles:
                rows = self.mean[a:b, a:]                                  # (b - a, K - a) on/above the diagonal
                rows.mul_(self.count / total).addmm_(xt[a:b], x[:, a:], alpha=1.0 / total)
            self.mirrored = False
        self.count = total

    def result(self) -> torch.Tensor:
        if not self.mirrored:
            for a, b in self.tiles[1:]:
                self.mean[a:b, :a] = self.mean[:a, a:b].T                  # the lower tiles from the upper
            self.mirrored = True
        return self.mean


class AbsMean:
    """Running mean of |x| per feature. (K,)"""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(k, dtype=torch.float32, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:            # x: (T, K)
        t = x.shape[0]
        if t == 0:
            return
        total = self.count + t
        s = x.to(self.mean.device, torch.float32).abs().sum(0)
        self.mean.mul_(self.count / total).add_(s, alpha=1.0 / total)
        self.count = total

    def result(self) -> torch.Tensor:
        return self.mean


class MinMax:
    """Running minimum and maximum over all values (per tensor): the range a static activation scale
    must cover (min-max calibration of W8A8 activations). `k` is accepted for make_observers' signature."""

    def __init__(self, k: int = 0, device: torch.device | str = "cpu") -> None:
        self.lo = torch.full((), float("inf"), device=device)
        self.hi = torch.full((), float("-inf"), device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:            # x: any shape
        if x.numel() == 0:
            return
        x = x.detach().to(self.lo.device, torch.float32)
        self.lo = torch.minimum(self.lo, x.amin())
        self.hi = torch.maximum(self.hi, x.amax())
        self.count += x.numel() // max(x.shape[-1], 1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise BitsmithError("a min-max observer saw no data; run calibration inputs through the layer")
        return self.lo, self.hi


class ChannelAbsMax:
    """Running max |x| per feature over rows. (K,)"""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.amax = torch.zeros(k, dtype=torch.float32, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:            # x: (T, K)
        if x.shape[0]:
            self.amax = torch.maximum(self.amax, x.detach().to(self.amax.device, torch.float32).abs().amax(0))
            self.count += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.amax


class Histogram:
    """Per-tensor activation statistics for static ranges: global min / max, an exponential moving average
    of each batch's min / max (torch.ao's MovingAverageMinMax, `momentum`), and `bins` counts of |x| over
    [0, R]. When a batch exceeds R, R grows by an integer factor f and old bin i merges into bin i // f, so
    the histogram stays exact without keeping the data (ONNX Runtime's collector does the same)."""

    KEEP_ROWS = 1024      # a uniform sample of rows, kept so a rescaled input (SmoothQuant) can be re-binned

    def __init__(self, k: int = 0, device: torch.device | str = "cpu", *, bins: int = 2048,
                 momentum: float = 0.01) -> None:
        self.bins, self.momentum = bins, momentum
        self.rows: torch.Tensor | None = None              # (<= KEEP_ROWS, K) sample of the 2-D inputs
        self.keys: torch.Tensor | None = None              # their random keys: the smallest are kept
        self.counts = torch.zeros(bins, dtype=torch.float64, device=device)
        self.edge = 0.0                                    # R: the histogram covers |x| in [0, R]
        self.lo = self.hi = self.ema_lo = self.ema_hi = 0.0
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.detach().to(self.counts.device, torch.float32)
        if x.dim() == 2:
            self._keep(x)
        x = x.reshape(-1)
        lo, hi = float(x.min()), float(x.max())
        if self.count == 0:
            self.lo, self.hi, self.ema_lo, self.ema_hi = lo, hi, lo, hi
        else:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
            m = self.momentum
            self.ema_lo, self.ema_hi = (1 - m) * self.ema_lo + m * lo, (1 - m) * self.ema_hi + m * hi
        self.count += 1
        a = x.abs()
        amax = float(a.max())
        if amax > self.edge:
            if self.edge == 0.0:
                self.edge = amax if amax > 0 else 1.0
            else:
                f = int(torch.ceil(torch.tensor(amax / self.edge)))
                merged = torch.zeros_like(self.counts)
                merged.index_add_(0, torch.arange(self.bins, device=merged.device) // f, self.counts)
                self.counts, self.edge = merged, self.edge * f
        idx = (a * (self.bins / self.edge)).long().clamp_(max=self.bins - 1)
        self.counts += torch.bincount(idx, minlength=self.bins).to(self.counts.dtype)

    def _keep(self, x: torch.Tensor) -> None:
        """Reservoir sampling by random keys: the rows with the KEEP_ROWS smallest keys of all seen."""
        keys = torch.rand(x.shape[0], device=x.device)
        rows = x if self.rows is None else torch.cat([self.rows, x])
        keys = keys if self.keys is None else torch.cat([self.keys, keys])
        if rows.shape[0] > self.KEEP_ROWS:
            keep = keys.topk(self.KEEP_ROWS, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys

    def rescaled(self, s: torch.Tensor) -> Histogram:
        """The statistics of x / s (per feature, s (K,)) rebuilt from the kept rows: SmoothQuant moves a
        per-channel scale into the weights after observation, which a histogram of |x| cannot follow."""
        if self.rows is None:
            raise BitsmithError("this histogram kept no rows (inputs were not 2-D); cannot rescale it")
        h = Histogram(bins=self.bins, momentum=self.momentum)
        h.update(self.rows / s.to(self.rows.device, torch.float32))
        return h

    def result(self) -> Histogram:
        if self.count == 0:
            raise BitsmithError("a histogram observer saw no data; run calibration inputs through the layer")
        return self


OBSERVERS = {"hessian": SecondMoment, "act_absmean": AbsMean, "act_minmax": MinMax,
             "act_channel_absmax": ChannelAbsMax, "act_hist": Histogram}
CLIP_RULES = ("minmax", "ema", "percentile", "mse", "entropy")


# ---- choosing a clipping threshold (pure functions of a histogram of |x|) ------------------------------
def clip_range(hist: Histogram, rule: str = "minmax", *, bits: int = 8, percentile: float = 99.99) -> float:
    """T, the |x| a symmetric static scale T / (2^(bits-1) - 1) should cover, by `rule`."""
    if rule == "minmax":
        return max(-hist.lo, hist.hi)
    if rule == "ema":
        return max(-hist.ema_lo, hist.ema_hi)
    counts, edge = hist.counts.double(), hist.edge
    if rule == "percentile":
        return percentile_threshold(counts, edge, percentile)
    if rule == "mse":
        return mse_threshold(counts, edge, bits)
    if rule == "entropy":
        return entropy_threshold(counts, edge, bits)
    raise BitsmithError(f"unknown observer {rule!r}; valid: {', '.join(CLIP_RULES)}")


def percentile_threshold(counts: torch.Tensor, edge: float, p: float) -> float:
    """The upper edge of the first bin where the cumulative share of |x| reaches p percent."""
    cdf = counts.cumsum(0) / counts.sum()
    i = int(torch.searchsorted(cdf, torch.tensor(p / 100.0, dtype=cdf.dtype)).clamp(max=len(counts) - 1))
    return (i + 1) * edge / len(counts)


def mse_threshold(counts: torch.Tensor, edge: float, bits: int) -> float:
    """T minimising the expected squared error: values below T get rounding noise step^2 / 12 (step =
    T / qmax), values above are clipped to T. Candidates are the bin edges."""
    b = len(counts)
    qmax = (1 << (bits - 1)) - 1
    c = (torch.arange(b, dtype=torch.float64) + 0.5) * edge / b                  # bin centers (B,)
    t = torch.arange(1, b + 1, dtype=torch.float64) * edge / b                   # candidates: upper edges
    # sum over bins above candidate i of n (c - T)^2 = S2 - 2 T S1 + T^2 S0, from suffix sums
    def above(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v.flip(0).cumsum(0).flip(0)[1:], v.new_zeros(1)])
    s0, s1, s2 = above(counts), above(counts * c), above(counts * c * c)
    clip = (s2 - 2 * t * s1 + t * t * s0).clamp(min=0)
    noise = (counts.sum() - s0) * (t / qmax) ** 2 / 12
    return float(t[int(torch.argmin(clip + noise))])


def entropy_threshold(counts: torch.Tensor, edge: float, bits: int) -> float:
    """TensorRT's entropy calibration: for each candidate T (a bin edge), P = the histogram up to T with
    everything above added to its last bin; Q = P merged into 2^(bits-1) levels and spread back over the
    non-empty bins; keep the T with the least KL(P || Q)."""
    b = len(counts)
    levels = 1 << (bits - 1)
    best, best_i = float("inf"), b
    for i in range(levels, b + 1, max(1, (b - levels) // 256)):
        p = counts[:i].clone()
        p[-1] += counts[i:].sum()
        nz = p > 0
        # each of the `levels` quantized bins spans i / levels histogram bins (the last takes the rest)
        level = (torch.arange(i) * levels // i).clamp(max=levels - 1)
        tot = torch.zeros(levels, dtype=p.dtype).index_add_(0, level, counts[:i])
        n = torch.zeros(levels, dtype=p.dtype).index_add_(0, level, nz.to(p.dtype))
        q = torch.where(nz, tot[level] / n[level].clamp(min=1), torch.zeros_like(p))
        ps, qs = p / p.sum(), q / q.sum().clamp(min=1e-30)
        m = nz & (qs > 0)
        if bool((nz & ~(qs > 0)).any()):
            continue
        kl = float((ps[m] * (ps[m] / qs[m]).log()).sum())
        if kl < best:
            best, best_i = kl, i
    return best_i * edge / b


def clip_per_channel(x: torch.Tensor, rule: str = "minmax", *, bits: int = 8, percentile: float = 99.99,
                     bins: int = 2048) -> torch.Tensor:
    """Per-row thresholds T (C,) of a (C, T) sample matrix (rows = channels, or tokens): each row's
    histogram of |x| with the same rule as `clip_range`."""
    out = []
    for row in x.detach().float():
        h = Histogram(bins=bins)
        h.update(row)
        out.append(clip_range(h, rule, bits=bits, percentile=percentile))
    return torch.tensor(out)


def input_ranges(modules: dict[str, nn.Module], run, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (min, max)} of each module's input over `run(batch)` for every batch: forward pre-hooks
    feed one MinMax per module (static per-tensor activation ranges; modules never reached are left out)."""
    obs = {name: MinMax() for name in modules}
    hooks = [m.register_forward_pre_hook(lambda _m, args, o=obs[name]: o.update(args[0]))
             for name, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                run(batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: o.result() for name, o in obs.items() if o.count}


def make_observers(needs: tuple[str, ...], k: int, device: torch.device | str = "cpu") -> dict:
    unknown = [n for n in needs if n not in OBSERVERS]
    if unknown:
        raise BitsmithError(f"unknown statistic(s) {', '.join(unknown)}; known: {', '.join(OBSERVERS)}")
    return {n: OBSERVERS[n](k, device) for n in needs}


def in_features(mod: nn.Module) -> int:
    """K, the number of columns of the module's flattened (N, K) weight."""
    w = mod.weight
    return w[0].numel()


def observable(mod: nn.Module) -> bool:
    """Whether `features` can turn this module's input into rows matching its flattened weight."""
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and not isinstance(mod.padding, str))


def features(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module input as rows of its weight's input features: (T, K)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])                                  # (T, K)
    if isinstance(mod, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])             # (B * L, C * kh * kw)
    raise BitsmithError(f"cannot observe the inputs of a {type(mod).__name__}")
