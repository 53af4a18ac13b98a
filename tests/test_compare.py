"""bitsmith compare (and eval's --kl-ref / --generate) on a tiny real Llama: planning, resume, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import types
from pathlib import Path

import pytest
import torch

from bitsmith import methods
from bitsmith.cli import main
from bitsmith.compare import PLANNED, Config, Settings, check_output_dir, plan, run_compare
from bitsmith.errors import BitsmithError

from .helpers import one_line_error, run_cli as run

# small and fast: 2 windows of 32 tokens, short generations and latency runs
SMALL = ["--seq-len", "32", "--max-tokens", "64", "--gen-tokens", "3", "--calib-samples", "2",
         "--calib-seq-len", "32"]


# ---- planning ------------------------------------------------------------------------------------------
def test_default_plan_takes_what_methods_holds():
    configs, _ = plan(None, None, 64)
    used = {c.recipe.method for c in configs}
    assert "rtn" in used and used <= set(methods.METHODS)
    assert [c.label for c in configs if c.recipe.method == "rtn"] == [
        "rtn int8-pc-asym", "rtn int4-g64-asym", "rtn int3-g64-asym"]


def test_unknown_method_is_an_error_listing_valid_ones():
    with pytest.raises(BitsmithError, match=r"unknown method 'magic'; valid methods: rtn"):
        plan([("rtn", None), ("magic", None)], [4], 64)


def test_planned_but_missing_method_is_skipped_with_a_note():
    missing = [m for m in PLANNED if m not in methods.METHODS]
    if not missing:
        pytest.skip("every planned method is installed")
    configs, notes = plan([("rtn", None), (missing[0], None)], [4], 64)
    assert [c.label for c in configs] == ["rtn int4-g64-asym"]
    assert any(missing[0] in n and "not available" in n for n in notes)


def test_unsupported_bits(monkeypatch):
    only4 = types.SimpleNamespace(NEEDS=(), BITS=(4,), quantize=methods.get("rtn").quantize)
    monkeypatch.setitem(methods.METHODS, "only4", only4)
    with pytest.raises(BitsmithError, match="only4 supports 4 bits, not 8; drop 8 from --bits"):
        plan([("only4", None)], [8, 4], 64)
    configs, notes = plan([("only4", None)], None, 64)          # default bits: skipped with a note
    assert [c.recipe.scheme.bits for c in configs] == [4] and len(notes) == 2
    configs, _ = plan([("rtn", None), ("only4", 4)], [8, 4], 64)  # NAME@BITS
    assert [c.label for c in configs] == ["rtn int8-pc-asym", "rtn int4-g64-asym", "only4 int4-g64-asym"]


def test_output_dir_checks_create_nothing(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(BitsmithError, match="is a file"):
        check_output_dir(f / "out")
    with pytest.raises(BitsmithError, match="not a directory"):
        check_output_dir(f)
    check_output_dir(tmp_path / "new" / "deeper")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


# ---- running -------------------------------------------------------------------------------------------
def test_compare_writes_report_and_resume_skips_finished(tiny_llama, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, _ = run(["compare", tiny_llama, "--methods", "rtn", "--bits", "8,4", "--output", out, *SMALL,
                           "--json"], capsys)
    assert code == 0
    res = json.loads(stdout)
    assert (res["computed"], res["resumed"]) == (3, 0)
    ref, r8, r4 = res["rows"]
    assert ref["kl"] == 0 and ref["top1"] == 1 and ref["dppl"] == 0
    assert r4["kl"] > r8["kl"] >= 0 and 0 < r4["top1"] <= 1
    assert r4["file_bytes"] == r8["file_bytes"] or r4["file_bytes"] < ref["file_bytes"]
    assert len(r4["generations"]) == 3 and r4["layers"] and r4["decode_tokens_per_s"] > 0
    assert {"report.html", "report.md", "report.json", "results"} <= set(os.listdir(out))
    assert not [p for p in out.rglob(".*")]               # no temp files or size probes left
    # the directory now holds a comparison: a plain rerun refuses and changes nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, _, err = run(["compare", tiny_llama, "--methods", "rtn", "--bits", "8,4", "--output", out, *SMALL], capsys)
    one_line_error(code, err, "already holds a comparison", "--resume", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # everything finished: a resumed run computes nothing
    code, stdout, _ = run(["compare", tiny_llama, "--methods", "rtn", "--bits", "8,4", "--output", out, *SMALL,
                           "--json", "--resume"], capsys)
    res2 = json.loads(stdout)
    assert code == 0 and (res2["computed"], res2["resumed"]) == (0, 3)
    assert [r["ppl"] for r in res2["rows"]] == [r["ppl"] for r in res["rows"]]
    # one more bits value: only it runs
    code, stdout, _ = run(["compare", tiny_llama, "--methods", "rtn", "--bits", "8,4,3", "--output", out, *SMALL,
                           "--resume"], capsys)
    assert code == 0 and "1 configuration(s) computed, 3 resumed" in stdout and "rtn int3-g64-asym" in stdout
    # different evaluation settings do not reuse stale results
    code, stdout, _ = run(["compare", tiny_llama, "--methods", "rtn", "--bits", "8", "--output", out,
                           *SMALL[:2], "--max-tokens", "96", *SMALL[4:], "--resume", "--json"], capsys)
    assert json.loads(stdout)["resumed"] == 0


def test_interrupted_run_resumes(tiny_llama, tmp_path):
    out = tmp_path / "cmp"
    settings = Settings(model=str(tiny_llama), seq_len=32, max_tokens=64, gen_tokens=0, latency_decode=2)
    started: list[str] = []

    def stop_at_third(cfg: Config) -> None:
        started.append(cfg.label)
        if len(started) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_compare(methods="rtn", bits=[8, 4], output=out, settings=settings, on_start=stop_at_third)
    assert len(list((out / "results").glob("*.json"))) == 2 and not list(out.rglob(".*"))
    res = run_compare(methods="rtn", bits=[8, 4], output=out, settings=settings, resume=True)
    assert (res["resumed"], res["computed"]) == (2, 1)


def test_text_shorter_than_a_window(tiny_llama, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("\n".join(f"line {i}" for i in range(20)))
    out = tmp_path / "cmp"
    code, _, err = run(["compare", tiny_llama, "--methods", "rtn", "--bits", "4", "--text", text,
                        "--output", out], capsys)
    one_line_error(code, err, "fewer than one window")
    assert not out.exists()


def test_bad_compare_inputs_are_one_line_errors(tiny_llama, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, _, err = run(["compare", tiny_llama, "--methods", "rtn", "--output", f / "out"], capsys)
    one_line_error(code, err, "choose another --output")
    code, _, err = run(["compare", tiny_llama, "--methods", "rtn,magic", "--output", tmp_path / "o"], capsys)
    one_line_error(code, err, "magic", "rtn")
    code, _, err = run(["compare", tiny_llama, "--bits", "4,12", "--output", tmp_path / "o"], capsys)
    one_line_error(code, err, "--bits")
    code, _, err = run(["compare", tiny_llama, "--baselines", "nope", "--output", tmp_path / "o"], capsys)
    one_line_error(code, err, "unknown baseline", "quanto")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_eval_kl_ref_and_generate(tiny_llama, capsys):
    code, stdout, _ = run(["eval", tiny_llama, "--kl-ref", tiny_llama, "--seq-len", "32", "--max-tokens", "64",
                           "--generate", "--prompt", "Hello", "--max-new-tokens", "3", "--json"], capsys)
    res = json.loads(stdout)
    assert code == 0 and res["kl"] == 0 and res["top1"] == 1 and res["tokens"] == 62
    assert res["generations"][0]["prompt"] == "Hello" and isinstance(res["generations"][0]["output"], str)


@pytest.mark.slow
def test_smollm2_compare_slice(tmp_path):
    """The real default model, a small slice: reference ppl agrees with perplexity(), int4 costs KL."""
    from bitsmith.evaluate import perplexity
    from bitsmith.models import load_any, load_text

    settings = Settings(seq_len=256, max_tokens=512, gen_tokens=8, latency_decode=4)
    res = run_compare(methods="rtn", bits=[4], output=tmp_path / "c", settings=settings)
    ref, r4 = res["rows"]
    lm = load_any("smollm2-135m")
    ppl = perplexity(lm.model, lm.tokenizer, load_text(None)[1], seq_len=256, max_tokens=512)["ppl"]
    print(f"\nSmolLM2 slice: fp32 ppl {ref['ppl']:.3f}, rtn int4 g64 ppl {r4['ppl']:.3f}, KL {r4['kl']:.4f}, "
          f"top-1 {r4['top1']:.3f}, {r4['file_bytes']:,} B")
    assert ref["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert 0 < r4["kl"] < 1 and 0.5 < r4["top1"] < 1 and r4["file_bytes"] < 0.3 * ref["file_bytes"]


def test_eval_wikitext2_protocol_scores_every_window(tiny_llama, tmp_path, capsys):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text("".join(f" Sentence number {i} about nothing in particular .\n \n" for i in range(60)))
    code, stdout, _ = run(["eval", tiny_llama, "--wikitext2", raw, "--seq-len", "32", "--max-tokens", "64", "--json"],
                          capsys)
    res = json.loads(stdout)
    assert code == 0 and res["protocol"] == "wikitext2"
    from bitsmith.evaluate import wikitext2_text
    from bitsmith.models import load_any

    n = len(load_any(str(tiny_llama)).tokenizer(wikitext2_text(raw), add_special_tokens=False)["input_ids"])
    assert res["windows"] == n // 32 > 64 // 32       # the protocol has no token cap: the whole text
    code, _, err = run(["eval", tiny_llama, "--wikitext2", tmp_path / "nope.raw"], capsys)
    one_line_error(code, err, "does not exist")


def test_baselines_share_the_table_or_are_skipped_with_a_note(tiny_llama, tmp_path):
    from bitsmith import baselines

    names = ["quanto", "hqq", "torchao", "llamacpp"]
    settings = Settings(model=str(tiny_llama), seq_len=32, max_tokens=64, gen_tokens=0, latency_decode=2)
    res = run_compare(methods="rtn", bits=[4], group_size=32, output=tmp_path / "b", baselines=names,
                      settings=settings)
    rows = {r["source"]: r for r in res["rows"]}
    ref, ours = res["rows"][0], rows["bitsmith"]
    for name in names:
        if not baselines.available(name):
            assert any(f"skipped baseline {name}: not installed" in n for n in res["notes"])
            continue
        if name == "llamacpp":          # needs the model as a .gguf file: the tiny test model is not one
            assert any("llama.cpp" in n and ".gguf" in n for n in res["notes"]), res["notes"]
            continue
        row = rows[name]
        # the same 4-bit precision lands near bitsmith's RTN in size and error, far from the reference
        assert row["bits"] == 4 and 0 < row["kl"] < 10 * ours["kl"] and row["ppl"] > 0
        assert row["size_bytes"] < 0.7 * ref["size_bytes"]
        assert row["bits_per_weight"] == pytest.approx(ours["bits_per_weight"], rel=0.05)
    with pytest.raises(BitsmithError, match="unknown baseline 'gguf'; valid baselines: quanto, hqq"):
        run_compare(methods="rtn", bits=[4], output=tmp_path / "c", baselines=["gguf"], settings=settings)


def test_a_broken_method_is_a_note_not_an_abort(tiny_llama, tmp_path, monkeypatch):
    rtn = methods.get("rtn")

    def fails_on_real_layers(weight, stats, scheme, name="weight", **kw):
        if name != "probe":
            raise RuntimeError("boom in a real layer")
        return rtn.quantize(weight, stats, scheme, name=name)

    def always_fails(*args, **kwargs):
        raise RuntimeError("not finished")

    monkeypatch.setitem(methods.METHODS, "late", types.SimpleNamespace(NEEDS=(), quantize=fails_on_real_layers))
    monkeypatch.setitem(methods.METHODS, "early", types.SimpleNamespace(NEEDS=(), quantize=always_fails))
    settings = Settings(model=str(tiny_llama), seq_len=32, max_tokens=64, gen_tokens=0, latency_decode=2)
    res = run_compare(methods="rtn,late,early", output=tmp_path / "o", settings=settings, bits=None)
    assert [r["config"] for r in res["rows"][1:]] == ["rtn int8-pc-asym", "rtn int4-g64-asym", "rtn int3-g64-asym"]
    assert res["failed"] == 3                      # late at 8, 4 and 3 bits
    assert any(n.startswith("late int4-g64-asym failed: RuntimeError: boom in a real layer") for n in res["notes"])
    assert any("skipped early at 4 bits" in n and "not finished" in n for n in res["notes"])
    assert len(list((tmp_path / "o" / "results").glob("*.json"))) == 4   # failures are not cached
