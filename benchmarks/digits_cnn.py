"""Binary and ternary weights end to end on a small real model: a CNN trained on scikit-learn's digits
(1797 8x8 images, 10 classes; 80/20 split with a fixed seed), trained in a few seconds on CPU.

The trained CNN is quantized post-training with 1-bit binary (sign x per-channel mean|w|, XNOR-Net) and
2-bit ternary weights ({-1, 0, +1} x per-channel scale, TWN threshold 0.7 mean|w|), either every layer or
all but the first conv and the classifier (the usual practice: those two hold few weights and most of the
damage), and next to them 8-bit and 4-bit RTN per channel. Each row: test accuracy, the checkpoint's bits
per quantized weight, and whether the saved checkpoint reloads to identical logits. No fine-tuning: this
is the accuracy cost of post-training binarisation, not of binary-aware training.

Needs scikit-learn (`pip install scikit-learn`, in bitsmith's dev extra).

    .venv/bin/python benchmarks/digits_cnn.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch
from torch import nn

import bitsmith
from bitsmith import Recipe, Scheme

FIRST_LAST = ("0", "8")      # module names of the first conv and the classifier in `make_cnn`


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images (n, 1, 8, 8) scaled to [0, 1], an 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


WIDTHS = (32, 64, 128)        # conv 1, conv 2, hidden linear


def make_cnn(widths: tuple[int, int, int] = WIDTHS) -> nn.Sequential:
    c1, c2, h = widths
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),         # 0, 1
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),        # 2, 3
        nn.MaxPool2d(2), nn.Flatten(),                     # 4, 5: (c2, 4, 4)
        nn.Linear(c2 * 16, h), nn.ReLU(),                  # 6, 7
        nn.Linear(h, 10),                                  # 8: the classifier
    )


def train(seed: int = 0, epochs: int = 25, widths: tuple[int, int, int] = WIDTHS) -> tuple[nn.Sequential, tuple]:
    torch.manual_seed(seed)
    data = digits(seed)
    xtr, ytr = data[0], data[1]
    model = make_cnn(widths)
    fit(model, xtr, ytr, epochs=epochs, lr=3e-3, seed=seed)
    return model.eval(), data


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int = 0) -> None:
    """Adam on cross-entropy, batches of 64 in a seeded order each epoch (training and QAT share it)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


ROWS = {
    "fp32": None,
    "int8 per-channel (rtn)": (Scheme(bits=8, group_size=None), ()),
    "int4 per-channel (rtn)": (Scheme(bits=4, group_size=None), ()),
    "ternary, all layers": (Scheme(grid="ternary", group_size=None), ()),
    "ternary, first/last fp": (Scheme(grid="ternary", group_size=None), FIRST_LAST),
    "binary, all layers": (Scheme(grid="binary", group_size=None), ()),
    "binary, first/last fp": (Scheme(grid="binary", group_size=None), FIRST_LAST),
}


def quantized(model: nn.Module, scheme: Scheme, ignore: tuple[str, ...]) -> nn.Module:
    m = copy.deepcopy(model)
    bitsmith.quantize(m, Recipe(method="rtn", scheme=scheme, ignore=ignore, keep_dtype=None))
    return m


def run(seed: int = 0) -> list[dict]:
    model, (_, _, xte, yte) = train(seed)
    rows = []
    for label, spec in ROWS.items():
        if spec is None:
            rows.append({"config": label, "accuracy": accuracy(model, xte, yte), "bpw": 32.0, "reloads": True})
            continue
        m = quantized(model, *spec)
        bpw = bitsmith.size_report(m)["quantized_bpw"]     # before any forward: kernels may cache buffers
        with tempfile.TemporaryDirectory() as d:
            out = bitsmith.save(m, f"{d}/q")
            loaded = bitsmith.load(out, make_cnn())
            reloads = bool(torch.equal(m(xte), loaded(xte)))
        rows.append({"config": label, "accuracy": accuracy(m, xte, yte), "bpw": bpw, "reloads": reloads})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = run(a.seed)
    print(f"digits CNN (sklearn digits, 360 test images, seed {a.seed}), post-training quantization")
    print("| weights | test accuracy | bits per quantized weight | reloads exactly |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {100 * r['accuracy']:.1f}% | {r['bpw']:.2f} | {r['reloads']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
