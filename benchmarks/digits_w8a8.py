"""Activation quantization and QAT on the digits CNN of benchmarks/digits_cnn.py (trained from scratch,
deterministic, seconds on CPU).

Rows: FP32; W8A8 static PTQ (int8 per-channel weights, int8 per-tensor activations calibrated on 256
training images, min-max observer) and dynamic; W4A8, W3A8, W2A8 PTQ (symmetric per-channel weights); W4A8 QAT
(fake-quant fine-tune from the FP32 model, `epochs` epochs, then `convert`) with and without LSQ scales;
W2A8 QAT (2-bit symmetric = {-1, 0, +1} x scale); W4A8 with one weight scale per tensor (PTQ, and QAT for
`epochs` and twice as many).
Each quantized row is saved and reloaded; "reloads" says whether the logits came back bit-identical.

The default CNN (32-64-128 wide, 140k weights) is so redundant that 4-bit per-channel PTQ costs it nothing,
so the same rows also run on a narrow CNN (`--widths 4,8,16`, 4.6k weights; one seed per `--seeds`) where
4-bit PTQ does lose and QAT has something to recover.

    .venv/bin/python benchmarks/digits_w8a8.py [--epochs 3] [--widths 4,8,16 --seeds 0,1,2,3] [--json out.json]
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
    """A quantized copy: w8a8 at `bits` weight bits, activations calibrated on 256 training images."""
    q = copy.deepcopy(model)
    bitsmith.quantize(q, w8a8_recipe(bits, **args), calib_ids=xtr[:256], batch_size=64)
    return q


def qat(model: nn.Module, data: tuple, bits: int, epochs: int, lsq: bool = False, seed: int = 0,
        per_tensor: bool = False) -> nn.Module:
    """Fine-tune a copy with fake quantization (Adam, lr 1e-3, batches of 64), then convert."""
    xtr, ytr = data[0], data[1]
    torch.manual_seed(seed)
    m = prepare_qat(copy.deepcopy(model), Recipe(scheme=Scheme(bits=bits, group_size=None, symmetric=True),
                                                  ignore=()), lsq=lsq, per_tensor=per_tensor)
    m.train()
    digits_cnn.fit(m, xtr, ytr, epochs=epochs, lr=1e-3, seed=seed)
    return convert(m.eval())


def reloads(model: nn.Module, x: torch.Tensor, widths: tuple[int, int, int]) -> bool:
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        bitsmith.save(model, f"{d}/m")
        back = bitsmith.load(f"{d}/m", digits_cnn.make_cnn(widths))
        return bool(torch.equal(model(x), back(x)))


def run(seed: int = 0, epochs: int = 3, rows: tuple[str, ...] | None = None,
        widths: tuple[int, int, int] = digits_cnn.WIDTHS) -> list[dict]:
    model, data = digits_cnn.train(seed, widths=widths)
    xtr, _, xte, yte = data
    plan = {
        "fp32": lambda: model,
        "w8a8 static (minmax)": lambda: ptq(model, xtr, 8),
        "w8a8 dynamic": lambda: ptq(model, xtr, 8, dynamic=True),
        "w4a8 ptq": lambda: ptq(model, xtr, 4),
        "w4a8 ptq per-tensor": lambda: ptq(model, xtr, 4, per_tensor=True),
        "w3a8 ptq": lambda: ptq(model, xtr, 3),
        "w2a8 ptq": lambda: ptq(model, xtr, 2),
        "w4a8 qat": lambda: qat(model, data, 4, epochs),
        "w4a8 qat lsq": lambda: qat(model, data, 4, epochs, lsq=True),
        "w4a8 qat per-tensor": lambda: qat(model, data, 4, epochs, per_tensor=True),
        "w4a8 qat per-tensor 2x epochs": lambda: qat(model, data, 4, 2 * epochs, per_tensor=True),
        "w2a8 qat": lambda: qat(model, data, 2, epochs),
        "w2a8 qat lsq": lambda: qat(model, data, 2, epochs, lsq=True),
    }
    out = []
    for name, make in plan.items():
        if rows is not None and name not in rows:
            continue
        m = make()
        row = {"config": name, "accuracy": digits_cnn.accuracy(m, xte, yte), "seed": seed, "widths": widths}
        if name != "fp32":
            row["reloads"] = reloads(m, xte, widths)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (data split, init, QAT order)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--widths", default=",".join(map(str, digits_cnn.WIDTHS)), help="conv1,conv2,hidden")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)             # the README numbers: fp32 conv sums (and so accuracies) vary with threads
    widths = tuple(int(v) for v in a.widths.split(","))
    seeds = [int(v) for v in a.seeds.split(",")]
    rows = [r for seed in seeds for r in run(seed, a.epochs, widths=widths)]
    for r in rows:
        print(f"seed {r['seed']} {r['config']:24s} accuracy {100 * r['accuracy']:6.2f}%  "
              f"reloads {r.get('reloads', '-')}")
    if len(seeds) > 1:
        for name in dict.fromkeys(r["config"] for r in rows):
            acc = [r["accuracy"] for r in rows if r["config"] == name]
            print(f"mean over {len(seeds)} seeds {name:24s} {100 * sum(acc) / len(acc):6.2f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
