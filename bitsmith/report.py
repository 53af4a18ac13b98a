"""Render a comparison (compare.run_compare's result) as DIR/report.html, report.md and report.json.

The HTML is self-contained: inline CSS, plots embedded as base64 PNG (matplotlib's Agg backend, no
display needed), no scripts and no network resources, so it opens anywhere, offline. Plots: size versus
quality loss with the Pareto front marked, and a per-layer weight-error heatmap (layer x configuration).
The recommendation is the smallest configuration whose quality loss stays within the budget (dPPL %
for language models, 100 x (1 - embedding cosine) for encoders). Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
PLOTS = {"size_quality.png": "Size versus quality", "layer_error.png": "Per-layer weight error"}


# ---- pure logic --------------------------------------------------------------------------------------
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, both coordinates lower-is-better (size, loss);
    sorted by the first coordinate. Equal points do not dominate each other."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(qx <= x and qy <= y and (qx < x or qy < y) for j, (qx, qy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def quality_loss(row: dict) -> float | None:
    """Percent of quality lost: dPPL % for a language model, 100 x (1 - mean cosine) for an encoder."""
    if row.get("dppl_pct") is not None:
        return row["dppl_pct"]
    if row.get("cosine") is not None:
        return 100 * (1 - row["cosine"])
    return None


def row_size(row: dict) -> float | None:
    """Bytes on disk where measured, else the tensors' payload bytes."""
    return row.get("file_bytes") or row.get("size_bytes")


def recommend(rows: list[dict], max_loss: float) -> tuple[dict | None, str]:
    """The smallest quantized row whose quality loss is at most max_loss percent, and a sentence saying so."""
    cands = [r for r in rows[1:] if quality_loss(r) is not None and row_size(r)]
    ok = [r for r in cands if quality_loss(r) <= max_loss]
    what = "dPPL" if any(r.get("dppl_pct") is not None for r in rows) else "quality loss (1 - cosine)"
    if not ok:
        if not cands:
            return None, "no quantized configuration to recommend"
        best = min(cands, key=quality_loss)
        return None, (f"no configuration stays within {max_loss:g}% {what}; the closest is {best['config']} "
                      f"({quality_loss(best):+.2f}%, {_mb(row_size(best))})")
    best = min(ok, key=lambda r: (row_size(r), quality_loss(r)))
    ref = row_size(rows[0]) if rows else None
    share = f", {100 * row_size(best) / ref:.0f}% of {rows[0]['config']}" if ref else ""
    return best, (f"Recommended: {best['config']} — the smallest configuration within {max_loss:g}% {what} "
                  f"({quality_loss(best):+.2f}%, {_mb(row_size(best))}{share})")


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the main table (shared by Markdown, HTML and the CLI)."""
    encoder = any(r.get("cosine") is not None for r in rows)
    head = ["config", "method", "bits", "group", "bits/weight", "size MB"]
    head += ["cosine", "retrieval agree", "retrieval top-1"] if encoder else ["ppl", "dPPL", "dPPL %", "KL", "top-1"]
    head += ["quantize s", "prefill tok/s", "decode tok/s", "peak RSS MB"]
    body = []
    for r in rows:
        cells = [r["config"], str(r.get("method", "")), _s(r.get("bits")), _group(r), _f(r.get("bits_per_weight"), 2),
                 _f(row_size(r) / 1e6 if row_size(r) else None, 1)]
        if encoder:
            cells += [_f(r.get("cosine"), 5), _pct(r.get("retrieval_agreement")), _pct(r.get("retrieval_top1"))]
        else:
            cells += [_f(r.get("ppl"), 3), _f(r.get("dppl"), 3, True), _f(r.get("dppl_pct"), 2, True),
                      _g(r.get("kl")), _pct(r.get("top1"))]
        mem = (r.get("memory") or {}).get("peak_bytes")
        cells += [_f(r.get("quantize_seconds"), 1), _f(r.get("prefill_tokens_per_s"), 0),
                  _f(r.get("decode_tokens_per_s"), 1), _f(mem / 1e6 if mem else None, 0)]
        body.append(cells)
    return head, body


def markdown_table(rows: list[dict]) -> str:
    head, body = table(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    """The table with aligned columns, for a terminal."""
    head, body = table(rows)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def heatmap_matrix(rows: list[dict], metric: str = "sqnr_db") -> tuple[list[str], list[str], list[list[float | None]]]:
    """(layer names, config labels, values[layer][config]) from the per-layer reports; layers in the order
    of the first configuration that has them."""
    cols = [r for r in rows if r.get("layers")]
    layers: list[str] = []
    for r in cols:
        layers += [n for n in r["layers"] if n not in layers]
    values = [[(r["layers"].get(n) or {}).get(metric) for r in cols] for n in layers]
    return layers, [r["config"] for r in cols], values


# ---- plots -------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)   # no display; never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_size_quality(rows: list[dict], max_loss: float | None = None) -> bytes | None:
    """PNG: size (MB) against quality loss (%), Pareto front joined and ringed; None without matplotlib.
    Each configuration has its own colour and a legend entry (labels written beside close points would
    overlap: 4-bit rows of different methods land within a few MB of each other)."""
    plt = _pyplot()
    pts = [(row_size(r) / 1e6, quality_loss(r), r) for r in rows if row_size(r) and quality_loss(r) is not None]
    if plt is None or not pts:
        return None
    front = pareto_front([(x, y) for x, y, _ in pts])
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    tab20 = plt.get_cmap("tab20").colors
    colours = tab20[::2] + tab20[1::2]      # the ten strong colours first, then their light twins
    markers = {"bitsmith": "o", "reference": "*"}
    for k, (x, y, r) in enumerate(pts):
        src = r.get("source", "bitsmith")
        ax.scatter(x, y, marker=markers.get(src, "s"), s=140 if src == "reference" else 45, zorder=3,
                   color=colours[k % len(colours)], label=f"{r['config']}  ({y:+.1f}%)")
    fx, fy = zip(*sorted((pts[i][0], pts[i][1]) for i in front))
    ax.plot(fx, fy, "-", color="#d62728", lw=1.2, zorder=2)
    ax.scatter(fx, fy, s=190, facecolors="none", edgecolors="#d62728", lw=1.4, zorder=4, label="Pareto front")
    if max_loss is not None:
        ax.axhline(max_loss, ls=":", color="#2ca02c", lw=1.2, label=f"budget {max_loss:g}%")
    ys = [y for _, y, _ in pts]
    log_y = max(ys) - min(ys) > 50      # 2-3 bit rows can lose 100s of %: keep the small ones readable
    if log_y:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(min(0.0, min(ys)) - 0.5, max(ys) * 2 if log_y else max(ys) * 1.1 + 0.5)
    xs = [x for x, _, _ in pts]
    if max(xs) > 2.5 * min(xs):     # the float reference is 3-4x the 4-bit rows: log keeps them apart
        ax.set_xscale("log")
        from matplotlib.ticker import ScalarFormatter

        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="both", labelsize=7)
    encoder = any(r.get("cosine") is not None for r in rows)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("quality loss: 100·(1 − cosine) %" if encoder else "perplexity increase dPPL (%)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Size versus quality (lower left is better; ringed: Pareto front)", fontsize=10)
    return _png(fig, plt)


def plot_layer_heatmap(rows: list[dict], metric: str = "sqnr_db") -> bytes | None:
    """PNG: weight SQNR (dB) per layer (rows) and configuration (columns); None without data or matplotlib."""
    plt = _pyplot()
    layers, cols, values = heatmap_matrix(rows, metric)
    if plt is None or not layers:
        return None
    import numpy as np

    data = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float)  # (layers, cfgs)
    fig, ax = plt.subplots(figsize=(3.5 + 0.9 * len(cols), 2 + 0.045 * len(layers)), dpi=110)
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=7)
    step = max(1, len(layers) // 40)     # at most ~40 labels stay legible
    ax.set_yticks(range(0, len(layers), step), [layers[i] for i in range(0, len(layers), step)], fontsize=5)
    fig.colorbar(im, ax=ax, label="weight SQNR dB" if metric == "sqnr_db" else metric)
    # GPTQ/AWQ minimise the layer's output error, not the weight error: lower SQNR there is expected
    ax.set_title("Per-layer weight SQNR (dB, higher = closer weights)", fontsize=9)
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---- documents ---------------------------------------------------------------------------------------
def render_markdown(result: dict, recommendation: str, images: dict[str, bytes]) -> str:
    rows = result["rows"]
    out = [f"# bitsmith compare: {result.get('model_name', result['model'])}", "", f"**{recommendation}**", "",
           _protocol(result), "", markdown_table(rows), ""]
    for name, title in PLOTS.items():
        if name in images:
            out += [f"![{title}]({name})", ""]
    gens = _generations(rows, list(result.get("settings", {}).get("prompts") or []))
    if gens:
        out += ["## Generations (greedy)", ""]
        for prompt, answers in gens:
            out += [f"**{prompt}**", "", "| config | output |", "|---|---|"]
            out += [f"| {c} | {_md_cell(t)} |" for c, t in answers] + [""]
    out += _notes(result)
    return "\n".join(out).rstrip() + "\n"


def render_html(result: dict, recommendation: str, images: dict[str, bytes]) -> str:
    rows = result["rows"]
    head, body = table(rows)
    esc = html.escape
    best = (result.get("recommendation") or {}).get("config")
    trs = "\n".join("<tr{}>{}</tr>".format(' class="best"' if cells[0] == best else "",
                                          "".join(f"<td>{esc(c)}</td>" for c in cells)) for cells in body)
    parts = [f"<h1>bitsmith compare: {esc(result.get('model_name', result['model']))}</h1>",
             f'<p class="rec">{esc(recommendation)}</p>', f"<p>{esc(_protocol(result))}</p>",
             "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + f"</tr></thead><tbody>{trs}</tbody></table>"]
    for name, title in PLOTS.items():
        if name in images:
            data = base64.b64encode(images[name]).decode("ascii")
            parts.append(f'<h2>{esc(title)}</h2><img alt="{esc(title)}" src="data:image/png;base64,{data}">')
    gens = _generations(rows, list(result.get("settings", {}).get("prompts") or []))
    if gens:
        parts.append("<h2>Generations (greedy)</h2>")
        for prompt, answers in gens:
            items = "".join(f"<tr><th>{esc(c)}</th><td>{esc(t)}</td></tr>" for c, t in answers)
            parts.append(f'<h3>{esc(prompt)}</h3><table class="gen">{items}</table>')
    notes = _notes(result)
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n[2:])}</li>" for n in notes if n.startswith("- ")) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>bitsmith compare</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "thead th{background:#f0f0f0}tr.best td{background:#e6f4e6;font-weight:600}"
        ".gen td{text-align:left;white-space:pre-wrap;max-width:900px}.rec{font-size:16px;font-weight:600}"
        "img{max-width:100%;border:1px solid #eee}")


def _protocol(result: dict) -> str:
    s = result.get("settings", {})
    env = result.get("environment", {})
    if result.get("kind") == "encoder":
        what = "embedding cosine to the unquantized model and retrieval agreement (mean pooling)"
    else:
        what = (f"perplexity, KL(unquantized || config) and top-1 agreement over {s.get('max_tokens')} held-out "
                f"tokens in windows of {s.get('seq_len')}")
    return (f"Model {result['model']}; {what}; calibrated methods: {s.get('calib_samples')} x "
            f"{s.get('calib_seq_len')} tokens. Sizes are bytes of the saved safetensors file. Speed: batch 1, "
            f"{env.get('threads')} torch threads on {env.get('cpus')} CPUs ({env.get('machine')}), torch "
            f"{env.get('torch')}. Peak RSS is the whole process, sampled while that configuration ran.")


def _generations(rows: list[dict], prompts: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    with_gen = [r for r in rows if r.get("generations")]
    if not with_gen:
        return []
    n = len(with_gen[0]["generations"])
    return [(prompts[i] if i < len(prompts) else f"prompt {i + 1}",
             [(r["config"], r["generations"][i]) for r in with_gen if i < len(r["generations"])]) for i in range(n)]


def _notes(result: dict) -> list[str]:
    notes = list(result.get("notes") or [])
    if result.get("resumed"):
        notes.append(f"{result['resumed']} of {len(result['rows'])} configurations resumed from earlier results")
    return (["## Notes", ""] + [f"- {n}" for n in notes] + [""]) if notes else []


def write_report(out_dir: str | Path, result: dict, max_dppl: float = 5.0) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the plot PNGs into out_dir (each atomically)."""
    out = Path(out_dir)
    best, sentence = recommend(result["rows"], max_dppl)
    result = {**result, "recommendation": {"config": best["config"] if best else None, "text": sentence,
                                           "max_dppl": max_dppl}}
    images = {k: v for k, v in {"size_quality.png": plot_size_quality(result["rows"], max_dppl),
                                "layer_error.png": plot_layer_heatmap(result["rows"])}.items() if v}
    if len(images) < len(PLOTS) and _pyplot() is None:
        result["notes"] = [*result.get("notes", []), "plots skipped: pip install 'bitsmith[report]' (matplotlib)"]
    paths = {}
    for name, data in images.items():
        paths[name] = atomic_write(out / name, data)
    paths["report.json"] = atomic_write(out / "report.json", json.dumps(result, indent=1, default=str) + "\n")
    paths["report.md"] = atomic_write(out / "report.md", render_markdown(result, sentence, images))
    paths["report.html"] = atomic_write(out / "report.html", render_html(result, sentence, images))
    return paths


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write to a temporary file beside `path`, then rename over it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- formatting --------------------------------------------------------------------------------------
def _f(v: Any, digits: int, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:,.{digits}f}" if digits == 0 else f"{v:.{digits}f}"


def _g(v: float | None) -> str:
    return "-" if v is None else "0" if v == 0 else f"{v:.3g}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


def _group(r: dict) -> str:
    if r.get("bits") is None or r.get("method") == "none":
        return "-"
    g = r.get("group_size")
    return "channel" if g is None else str(g)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _md_cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>") or " "
