"""The command line: happy paths on a tiny real Llama checkpoint, and every bad input the issue names gives
one line on stderr, exit code 2, and touches nothing."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitsmith.cli import main

from .conftest import TOKENIZER_FILES
from .helpers import one_line_error, run_cli as run


def test_quantize_eval_inspect_round_trip(tiny_llama, tmp_path, capsys):
    out = tmp_path / "q4"
    code, stdout, _ = run(["quantize", tiny_llama, "--bits", "4", "--group-size", "32", "--output", out,
                           "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["layers"] == 14 and summary["file_bytes"] == os.path.getsize(out / "model.safetensors")
    assert {"model.safetensors", "quantization_config.json", "config.json", "recipe.yaml", "quant_report.json",
            "tokenizer.json"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsmith"

    code, stdout, _ = run(["eval", out, "--seq-len", "64", "--max-tokens", "256", "--json"], capsys)
    res = json.loads(stdout)
    assert code == 0 and res["tokens"] == 4 * 63 and res["ppl"] > 1
    assert res["size_bytes"] == os.path.getsize(out / "model.safetensors")
    assert 4 < res["bits_per_weight"] < 16

    code, stdout, _ = run(["inspect", out, "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and len(info["layers"]) == 14
    assert info["file_bytes"] == os.path.getsize(out / "model.safetensors")
    assert all(4.5 < r["bpw"] < 5.5 for r in info["layers"])       # 4 bits + fp16 scale + 4-bit zero per 32
    code, stdout, _ = run(["inspect", out], capsys)
    assert "model.layers.0.self_attn.q_proj" in stdout and "bits per weight" in stdout


def test_eval_reports_what_it_promises(tiny_llama, capsys):
    code, stdout, _ = run(["eval", tiny_llama, "--seq-len", "32", "--max-tokens", "96", "--json"], capsys)
    res = json.loads(stdout)
    assert code == 0 and {"ppl", "tokens", "size_bytes", "bits_per_weight"} <= set(res)
    assert res["bits_per_weight"] == pytest.approx(32.0)


def test_recipe_file_is_used_and_saved(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: rtn\nscheme: {bits: 3, group_size: -1, symmetric: true}\nignore: [lm_head, 're:.*mlp.*']\n")
    out = tmp_path / "q3"
    code, _, _ = run(["quantize", tiny_llama, "--recipe", recipe, "--output", out, "--json"], capsys)
    assert code == 0
    cfg = json.loads((out / "quantization_config.json").read_text())
    assert len(cfg["modules"]) == 8 and all(m["scheme"]["bits"] == 3 for m in cfg["modules"].values())
    assert "symmetric: true" in (out / "recipe.yaml").read_text()
    recipe.write_text("method: rtn\nbitz: 4\n")
    code, _, err = run(["quantize", tiny_llama, "--recipe", recipe, "--output", tmp_path / "x"], capsys)
    one_line_error(code, err, "bitz")


def test_missing_model_path(tmp_path, capsys):
    code, _, err = run(["quantize", tmp_path / "nope", "--output", tmp_path / "o"], capsys)
    one_line_error(code, err, "does not exist")


def test_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run(["eval", tmp_path], capsys)
    one_line_error(code, err, "not a model directory")


def test_truncated_safetensors(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run(["quantize", bad, "--output", tmp_path / "o"], capsys)
    one_line_error(code, err, "model.safetensors")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,needle", [("--bits", "0", "--bits"), ("--bits", "9", "--bits"),
                                               ("--group-size", "0", "--group-size"), ("--bits", "x", "--bits")])
def test_bad_numbers(flag, value, needle, tmp_path, capsys):
    code, _, err = run(["quantize", "smollm2-135m", flag, value, "--output", tmp_path / "o"], capsys)
    one_line_error(code, err, needle)


def test_existing_output_is_not_touched(tiny_llama, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.bin").write_bytes(b"\x00" * 10)
    code, _, err = run(["quantize", tiny_llama, "--output", out], capsys)
    one_line_error(code, err, "--overwrite")
    assert os.listdir(out) == ["precious.bin"] and (out / "precious.bin").read_bytes() == b"\x00" * 10
    code, _, _ = run(["quantize", tiny_llama, "--output", out, "--overwrite", "--json"], capsys)
    assert code == 0 and "precious.bin" not in os.listdir(out)


def test_nan_weight_is_named(tiny_llama, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    bad = tmp_path / "nan"
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    m.save_pretrained(str(bad))
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_llama / name, bad / name)
    code, _, err = run(["quantize", bad, "--output", tmp_path / "o"], capsys)
    one_line_error(code, err, "model.layers.1.mlp.up_proj.weight", "NaN")
    assert not (tmp_path / "o").exists()


def test_unknown_method_lists_valid_ones(tiny_llama, tmp_path, capsys):
    code, _, err = run(["quantize", tiny_llama, "--method", "magic", "--output", tmp_path / "o"], capsys)
    one_line_error(code, err, "magic", "rtn")


def test_env(capsys):
    code, stdout, _ = run(["env", "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["torch"] == torch.__version__ and "transformers" in info["optional"]


def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("bitsmith")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bitsmith.cli"]
    p = subprocess.run([*cmd, "inspect", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_import_needs_only_torch_and_safetensors():
    code = (
        "import sys; import torch, safetensors, safetensors.torch; before = set(sys.modules); import bitsmith; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "stdlib = set(sys.stdlib_module_names); "
        "extra = sorted(m for m in new if m not in stdlib and m != 'bitsmith' and not m.startswith('_')); "
        "print(extra); assert not extra, extra"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
