"""True size accounting: bytes in memory, bytes a checkpoint stores, bits per weight overall and per layer.

Everything counts: scales, zero points, act-order permutations, biases, norms and the embedding (at the
dtype it is stored in). A tied embedding/head is one tensor and is counted once. `payload_bytes` is the
sum of the stored tensors; the file adds only the safetensors header, which `file_bytes` measures.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from torch import nn

from .checkpoint import WEIGHTS, storage_state
from .nn import _Packed


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def memory_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers held in memory (shared storage counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += tensor_bytes(t)
    return total


def weight_count(model: nn.Module) -> int:
    """Number of parameters the *unquantized* model had (quantized weights count N*K, tied once)."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, _Packed):
            n += m.n * m.k
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


def layer_rows(model: nn.Module) -> list[dict]:
    """One row per quantized module: its bits per weight as stored, everything included."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, _Packed):
            # Stored bytes only: a kernel's non-persistent cache (a repacked layout made at the first forward)
            # is never saved and must not inflate bits per weight; memory_bytes still counts it.
            skip = getattr(m, "_non_persistent_buffers_set", set())
            nbytes = sum(tensor_bytes(t) for k, t in m.named_buffers(recurse=False) if k not in skip)
            rows.append({"name": name, "method": m.method, "scheme": m.scheme.label(), "bits": m.scheme.bits,
                         "group_size": m.scheme.group_size, "weights": m.n * m.k, "bytes": nbytes,
                         "bpw": 8 * nbytes / (m.n * m.k)})
    return rows


def size_report(model: nn.Module) -> dict:
    state, _ = storage_state(model)
    payload = sum(tensor_bytes(t) for t in state.values())
    weights = weight_count(model)
    rows = layer_rows(model)
    qweights = sum(r["weights"] for r in rows)
    qbytes = sum(r["bytes"] for r in rows)
    return {"memory_bytes": memory_bytes(model), "payload_bytes": payload, "weights": weights,
            "bits_per_weight": 8 * payload / weights,
            "quantized_weights": qweights,
            "quantized_bpw": 8 * qbytes / qweights if qweights else None,
            "layers": rows}


def file_bytes(checkpoint_dir: str | Path) -> int:
    """Bytes of the saved weights file(s) on disk."""
    return sum(p.stat().st_size for p in Path(checkpoint_dir).glob("*.safetensors"))


def safetensors_header_bytes(path: str | Path) -> int:
    """Length of a safetensors file's header (8-byte length prefix + JSON), read from the file itself."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        json.loads(f.read(n))
    return 8 + n


def weights_path(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / WEIGHTS
