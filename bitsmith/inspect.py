"""`bitsmith inspect DIR`: what a checkpoint holds, per layer, read from its files without building the model.

Bytes come from the safetensors header (dtype x shape of each stored tensor), so the table is the truth
about the file: every scale, zero point and permutation is counted against its layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import WEIGHTS, read_qconfig
from .errors import BitsmithError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file: name -> {dtype, shape, data_offsets}."""
    import struct

    if not path.is_file():
        raise BitsmithError(f"{path} is missing; the checkpoint is incomplete")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BitsmithError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise BitsmithError(f"{path} has a header length of {n} bytes but the file is {size} bytes (truncated?)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise BitsmithError(f"{path} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise BitsmithError(f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return header


def _weights_of(info: dict) -> int:
    t = info["type"]
    if t.startswith("linear"):          # linear, linear_int8 (LLM.int8()), linear_hadamard (incoherence)
        return info["in_features"] * info["out_features"]
    if t == "conv2d":
        kh, kw = info["kernel_size"]
        return info["out_channels"] * info["in_channels"] // info["groups"] * kh * kw
    return info["num_embeddings"] * info["embedding_dim"]


def inspect_checkpoint(d: str | Path) -> dict:
    d = Path(d)
    if not d.is_dir():
        raise BitsmithError(f"{d} is not a directory; pass a directory written by `bitsmith quantize`")
    qcfg = read_qconfig(d)
    header = read_header(d / WEIGHTS)
    nbytes = {k: _DTYPE_BYTES.get(v["dtype"], 0) * _numel(v["shape"]) for k, v in header.items()}
    rows, claimed = [], set()
    for name, info in qcfg["modules"].items():
        keys = [k for k in header if k.rpartition(".")[0] == name and not k.endswith(".bias")]
        claimed.update(keys)
        b, w = sum(nbytes[k] for k in keys), _weights_of(info)
        s = info["scheme"]
        rows.append({"name": name, "method": info["method"], "bits": s["bits"], "group_size": s["group_size"],
                     "grid": s["grid"], "symmetric": s["symmetric"], "weights": w, "bytes": b, "bpw": 8 * b / w})
    other = {k: v for k, v in header.items() if k not in claimed}
    other_bytes = sum(nbytes[k] for k in other)
    other_weights = sum(_numel(v["shape"]) for v in other.values() if v["dtype"] in ("F32", "F16", "BF16", "F64"))
    payload = sum(nbytes.values())
    weights = sum(r["weights"] for r in rows) + other_weights
    dtypes = sorted({v["dtype"] for v in other.values()})
    result = {"dir": str(d), "file_bytes": (d / WEIGHTS).stat().st_size, "payload_bytes": payload,
              "weights": weights, "bits_per_weight": 8 * payload / max(weights, 1),
              "quantized_layers": len(rows), "unquantized_bytes": other_bytes, "unquantized_dtypes": dtypes,
              "recipe": qcfg.get("recipe"), "layers": rows}
    report = d / "quant_report.json"
    if report.is_file():
        rep = json.loads(report.read_text(encoding="utf-8"))
        by_name = {r["name"]: r for r in rep.get("layers", [])}
        for r in rows:
            extra = by_name.get(r["name"], {})
            r.update({k: v for k, v in extra.items() if k not in r and k not in ("shape", "scheme")})
        result["quantize_seconds"] = rep.get("seconds")
    return result


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def render(info: dict) -> str:
    # quant_report.json columns: calibrated methods' output error before (RTN) / after, GPTQ's damping and
    # fallbacks, AWQ's fold
    extra_cols = [c for c in ("sqnr_db", "out_rel_err_before", "out_rel_err", "damp", "fallback", "awq_fold")
                  if any(c in r for r in info["layers"])]
    head = ["layer", "method", "bits", "group", "bpw", "bytes", *extra_cols]
    lines = [head]
    for r in info["layers"]:
        g = "pc" if r["group_size"] is None else str(r["group_size"])
        lines.append([r["name"], r["method"], f"{r['bits']}{'' if r['grid'] == 'int' else ' ' + r['grid']}", g,
                      f"{r['bpw']:.3f}", str(r["bytes"]), *[_fmt(r.get(c)) for c in extra_cols]])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.append("")
    out.append(f"quantized layers: {info['quantized_layers']}; unquantized tensors: {info['unquantized_bytes']:,} "
               f"bytes ({', '.join(info['unquantized_dtypes']) or '-'})")
    out.append(f"total: {info['file_bytes']:,} bytes on disk ({info['payload_bytes']:,} of tensors), "
               f"{info['weights']:,} weights, {info['bits_per_weight']:.3f} bits per weight")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
