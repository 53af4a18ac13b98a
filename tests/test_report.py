"""bitsmith.report: Pareto front, recommendation, self-contained HTML/Markdown/JSON, and a headless-Chromium
render of report.html (skipped where no Chromium is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from bitsmith.report import markdown_table, pareto_front, recommend, write_report


# ---- pure logic ----------------------------------------------------------------------------------------
def test_pareto_front_on_hand_made_points():
    # (size, loss): lower is better in both
    pts = [(10, 0.0), (5, 1.0), (6, 3.0), (3, 8.0), (3, 9.0), (4, 8.0), (2, 50.0), (7, 0.5), (10, 0.0)]
    # (6, 3) loses to (5, 1); (3, 9) and (4, 8) lose to (3, 8); equal points (10, 0) both stay
    assert pareto_front(pts) == [6, 3, 1, 7, 0, 8]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    # a point better in both coordinates than everything else is the whole front
    assert pareto_front([(5, 5), (1, 1), (3, 2), (2, 4)]) == [1]


def _row(config, size, dppl_pct, **kw):
    return {"config": config, "method": config.split()[0], "file_bytes": size, "dppl_pct": dppl_pct,
            "ppl": 10 * (1 + dppl_pct / 100), "dppl": dppl_pct / 10, **kw}


ROWS = [_row("fp32 (unquantized)", 500e6, 0.0, source="reference", bits=32),
        _row("rtn int8-pc-asym", 160e6, 0.2, bits=8), _row("rtn int4-g64-asym", 110e6, 9.0, bits=4),
        _row("gptq int4-g64-asym", 110e6, 4.0, bits=4), _row("rtn int3-g64-asym", 95e6, 60.0, bits=3),
        _row("hqq int4-g64-asym", 111e6, 3.5, bits=4)]


def test_recommendation_is_the_smallest_within_budget():
    best, text = recommend(ROWS, 5.0)
    assert best["config"] == "gptq int4-g64-asym" and "within 5% dPPL" in text and "110.0 MB" in text
    best, _ = recommend(ROWS, 1.0)
    assert best["config"] == "rtn int8-pc-asym"
    best, _ = recommend(ROWS, 100.0)
    assert best["config"] == "rtn int3-g64-asym"
    best, text = recommend(ROWS, 0.1)        # nothing fits: no recommendation, the closest is named
    assert best is None and "no configuration stays within 0.1%" in text and "rtn int8-pc-asym" in text
    assert recommend(ROWS[:1], 5.0) == (None, "no quantized configuration to recommend")


def test_markdown_table_has_every_column():
    head = markdown_table(ROWS).splitlines()[0]
    for col in ("method", "bits", "group", "bits/weight", "size MB", "ppl", "dPPL", "KL", "top-1", "quantize s",
                "prefill tok/s", "decode tok/s"):
        assert f" {col} " in head, col


# ---- the written report --------------------------------------------------------------------------------
def _result() -> dict:
    rows = [dict(r) for r in ROWS]
    for i, r in enumerate(rows):
        r.update(kl=0.01 * i, top1=1 - 0.02 * i, quantize_seconds=1.5 * i, prefill_tokens_per_s=900.0,
                 decode_tokens_per_s=20.0, bits_per_weight=16 / (i + 1),
                 generations=[f"answer <{i}> | with markup & pipes", "second"])
        if i:
            r["layers"] = {f"model.layers.{k}.mlp.down_proj": {"sqnr_db": 10.0 + k + i} for k in range(4)}
    return {"model": "hand-made", "model_name": "hand-made", "kind": "causal-lm", "rows": rows,
            "settings": {"prompts": ["What is <b>bold</b>?", "Second prompt"], "seq_len": 8, "max_tokens": 16},
            "notes": ["skipped method 'awq': not available yet"], "resumed": 0, "computed": len(rows),
            "environment": {"threads": 2, "cpus": 2}}


def test_write_report_is_self_contained(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_report(tmp_path / "rep", _result(), max_dppl=5.0)
    assert {"report.html", "report.md", "report.json", "size_quality.png", "layer_error.png"} <= set(paths)
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.startswith(".")]   # no temp files left
    page = paths["report.html"].read_text(encoding="utf-8")
    # nothing that could reach the network: no scripts, stylesheets, fonts or remote images
    assert not re.search(r"<script|<link|@import|url\(|(src|href)=\"(?!data:)", page), "external resource"
    assert page.count('src="data:image/png;base64,') == 2
    assert "answer &lt;0&gt; | with markup &amp; pipes" in page and "<b>bold</b>" not in page
    assert '<tr class="best"><td>gptq int4-g64-asym</td>' in page
    rep = json.loads(paths["report.json"].read_text(encoding="utf-8"))
    assert rep["recommendation"]["config"] == "gptq int4-g64-asym" and rep["recommendation"]["max_dppl"] == 5.0
    md = paths["report.md"].read_text(encoding="utf-8")
    assert "![Size versus quality](size_quality.png)" in md and "Recommended: gptq int4-g64-asym" in md
    assert "answer &lt;0&gt; \\| with markup" in md and "awq" in md


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


# Added to a copy of the page only: once everything has loaded, the title reports what rendered.
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const net = performance.getEntriesByType("resource").filter(e => !e.name.startsWith("data:")).length;
  document.title = ["RENDERED", imgs.length, imgs.filter(i => i.complete && i.naturalWidth > 100).length,
                    document.querySelectorAll("table")[0].rows.length, net].join(":");
});</script>"""


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed")
def test_report_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_report(tmp_path / "rep", _result(), max_dppl=5.0)
    page = paths["report.html"].read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", "--virtual-time-budget=5000",
           # any network request would fail: resolve every host to nothing and send traffic to a dead proxy
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()]
    env = {**os.environ, "HOME": str(tmp_path)}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("Chromium did not finish in 120 s on this machine")
    m = re.search(r"<title>RENDERED:(\d+):(\d+):(\d+):(\d+)</title>", out.stdout)
    if m is None and "<html" not in out.stdout:
        pytest.skip(f"Chromium could not run here: {out.stderr.strip().splitlines()[-1:]}")
    assert m is not None, out.stdout[:500]
    images, decoded, table_rows, network = map(int, m.groups())
    assert images == 2 and decoded == 2               # both plots decoded to real pictures
    assert table_rows == 1 + len(ROWS)                 # header + one row per configuration
    assert network == 0                                # the page fetched nothing
