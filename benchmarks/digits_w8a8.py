"""Activation quantization and QAT on the digits CNN of benchmarks/digits_cnn.py (trained from scratch,
deterministic, seconds on CPU).

Rows: FP32; W8A8 static PTQ (int8 per-channel weights, int8 per-tensor activations calibrated on 256
training images, min-max observer) and dynamic; W4A8, W3A8, W2A8 PTQ (symmetric per-channel weights); W4A8 QAT
(fake-quant fine-tune from the FP32 model, `epochs` epochs, then `convert`) with and without LSQ scales;
W2A8 QAT (2-bit symmetric = {-1, 0, +1} x scale). Each quantized row is saved and reloaded; "reloads"
says whether the logits came back bit-identical.

    .venv/bin/python benchmarks/digits_w8a8.py [--epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

import bitsmith
from bitsmith import Recipe, Scheme
from bitsmith.qat import convert, prepare_qat

_spec = importlib.util.spec_from_file_location("digits_cnn", Path(__file__).with_name("digits_cnn.py"))
digits_cnn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits_cnn)


def w8a8_recipe(bits: int, **args) -> Recipe:
    return Recipe(method="w8a8", scheme=Scheme(bits=bits, group_size=None, symmetric=True), ignore=(),
                  method_args=args)


def ptq(model: nn.Module, xtr: torch.Tensor, bits: int, **args) -> nn.Module:
    q = copy.deepcopy(model)
    bitsmith.quantize(q, w8a8_recipe(bits, **args), calib_ids=xtr[:256], batch_size=64)
    return q


def qat(model: nn.Module, data: tuple, bits: int, epochs: int, lsq: bool = False, seed: int = 0) -> nn.Module:
    """Fine-tune a copy with fake quantization (Adam, lr 1e-3, batches of 64), then convert."""
    xtr, ytr = data[0], data[1]
    torch.manual_seed(seed)
    m = prepare_qat(copy.deepcopy(model), Recipe(scheme=Scheme(bits=bits, group_size=None, symmetric=True),
                                                  ignore=()), lsq=lsq)
    m.train()
    digits_cnn.fit(m, xtr, ytr, epochs=epochs, lr=1e-3, seed=seed)
    return convert(m.eval())


def reloads(model: nn.Module, x: torch.Tensor) -> bool:
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        bitsmith.save(model, f"{d}/m")
        back = bitsmith.load(f"{d}/m", digits_cnn.make_cnn())
        return bool(torch.equal(model(x), back(x)))


def run(seed: int = 0, epochs: int = 3, rows: tuple[str, ...] | None = None) -> list[dict]:
    model, data = digits_cnn.train(seed)
    xtr, _, xte, yte = data
    plan = {
        "fp32": lambda: model,
        "w8a8 static (minmax)": lambda: ptq(model, xtr, 8),
        "w8a8 dynamic": lambda: ptq(model, xtr, 8, dynamic=True),
        "w4a8 ptq": lambda: ptq(model, xtr, 4),
        "w3a8 ptq": lambda: ptq(model, xtr, 3),
        "w2a8 ptq": lambda: ptq(model, xtr, 2),
        "w4a8 qat": lambda: qat(model, data, 4, epochs),
        "w4a8 qat lsq": lambda: qat(model, data, 4, epochs, lsq=True),
        "w2a8 qat": lambda: qat(model, data, 2, epochs),
        "w2a8 qat lsq": lambda: qat(model, data, 2, epochs, lsq=True),
    }
    out = []
    for name, make in plan.items():
        if rows is not None and name not in rows:
            continue
        m = make()
        row = {"config": name, "accuracy": digits_cnn.accuracy(m, xte, yte)}
        if name != "fp32":
            row["reloads"] = reloads(m, xte)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = run(a.seed, a.epochs)
    for r in rows:
        print(f"{r['config']:24s} accuracy {100 * r['accuracy']:6.2f}%  reloads {r.get('reloads', '-')}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
