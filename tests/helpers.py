"""Shared test helpers: SQNR, the debugging currency for quantizers."""

from __future__ import annotations

import math
import re

import torch


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of approximation y to reference x, in dB (inf when equal)."""
    x, y = x.double(), y.double()
    noise = (x - y).pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(x.pow(2).sum().item() / noise)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """bitsmith's CLI in-process: (exit code, stdout, stderr)."""
    from bitsmith.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, no traceback, and exactly one 'bitsmith: error:' line that names every needle."""
    assert code == 2 and "Traceback" not in err
    # progress bars may share stderr (carriage returns); exactly one line is bitsmith's message
    lines = [ln for ln in re.split(r"[\r\n]", err) if "error:" in ln]
    assert len(lines) == 1, err
    line = lines[0][lines[0].index("bitsmith: error:"):]
    for n in needles:
        assert n in line, line
