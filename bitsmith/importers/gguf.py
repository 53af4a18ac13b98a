"""Import a GGUF file's quantized tensors as QWeights, without a float round trip.

`read_gguf` first walks the file's header itself, checking every count and length against the bytes
that are really there (bad magic, absurd tensor/key/array counts, strings or tensor data past the end),
so a corrupt or hostile file is refused with one line before the `gguf` package's reader maps anything;
nothing in a GGUF can execute code. `load` then builds the Hugging Face model skeleton (config and
tokenizer from the cached conversion in models.py) and fills it from the file: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
and Q4_K/Q5_K/Q6_K tensors become QuantLinear / QuantEmbedding modules holding the file's codes and scales
(gguf_blocks.to_qweight), float tensors are copied, and llama.cpp's Q/K row permutation is undone.
"""

from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BitsmithError
from ..export import gguf_blocks as gb
from ..export import require

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
MAX_DIMS = 4                                        # GGML_MAX_DIMS
# GGUF value types: fixed sizes; 8 = string, 9 = array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
SUPPORTED_ARCHS = ("llama", "qwen2")                # GGUF architectures load() rebuilds (Mistral is "llama")


class _Cursor:
    """Bounds-checked little-endian reads over a mapped file: nothing is read past its end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> BitsmithError:
        return BitsmithError(f"{self.path} is not a valid GGUF file: {what} (truncated or corrupt?)")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos} but the file has {self.size}")
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"{what} length")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n])

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            start = self.take(_SCALAR[vtype], what)
            return bytes(self.buf[start:start + _SCALAR[vtype]])
        if vtype == 8:
            return self.string(what)
        if vtype == 9 and depth < 2:
            itype, count = self.u32(f"{what} item type"), self.u64(f"{what} count")
            least = _SCALAR.get(itype, 8 if itype == 8 else 12)
            if count * least > self.size - self.pos:          # reject before looping over an absurd count
                raise self.fail(f"{what} claims {count} items, more than the remaining {self.size - self.pos} bytes")
            if itype in _SCALAR:
                self.take(count * least, what)
            else:
                for _ in range(count):
                    self.value(itype, what, depth + 1)
            return None
        raise self.fail(f"{what} has unknown value type {vtype}")


def validate(path: Path) -> list[dict]:
    """Walk the header and tensor table of a GGUF file, checking every size against the file; returns the
    tensor table [{name, shape (GGUF order), type, offset, nbytes}]."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BitsmithError(f"cannot read {path}: {e}") from e
    if size < 24:
        raise BitsmithError(f"{path} is not a valid GGUF file: {size} bytes is shorter than its header")
    gguf = require("gguf", "gguf")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, path)
        if bytes(buf[:4]) != MAGIC:
            raise BitsmithError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
        c.take(4, "magic")
        version = c.u32("version")
        if version not in (2, 3):
            raise BitsmithError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = c.u64("tensor count"), c.u64("key count")
        # every key takes >= 13 bytes and every tensor entry >= 33: reject absurd counts before looping
        if 24 + 13 * n_kv + 33 * n_tensors > size:
            raise c.fail(f"{n_tensors} tensors and {n_kv} keys cannot fit in {size} bytes")
        alignment = 32
        for i in range(n_kv):
            key = c.string(f"key {i}").decode("utf-8", "replace")
            vtype = c.u32(f"type of {key}")
            raw = c.value(vtype, key)
            if key == "general.alignment" and vtype == 4:
                alignment = struct.unpack("<I", raw)[0]
                if alignment == 0 or alignment & (alignment - 1):
                    raise c.fail(f"general.alignment {alignment} is not a power of two")
        table = []
        for i in range(n_tensors):
            name = c.string(f"tensor {i} name").decode("utf-8", "replace")
            n_dims = c.u32(f"{name} dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            shape = [c.u64(f"{name} dim") for _ in range(n_dims)]
            ttype, offset = c.u32(f"{name} type"), c.u64(f"{name} offset")
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
            except ValueError:
                raise c.fail(f"tensor {name} has unknown type {ttype}") from None
            block, tsize = gguf.GGML_QUANT_SIZES[qtype]
            if shape[0] % block:
                raise c.fail(f"tensor {name}: {shape[0]} values per row is not a multiple of {qtype.name}'s {block}")
            n = 1
            for d in shape:
                n *= d                                         # Python ints: no overflow, nothing allocated
            table.append({"name": name, "shape": shape, "type": qtype.name, "offset": offset,
                          "nbytes": n // block * tsize})
        data_start = -(-c.pos // alignment) * alignment
        for t in table:
            end = data_start + t["offset"] + t["nbytes"]
            if end > size:
                raise c.fail(f"tensor {t['name']} ({t['type']} {t['shape']}) ends at byte {end}, past the end "
                             f"of the file ({size} bytes)")
    return table


def read_gguf(path: str | Path) -> Any:
    """A gguf.GGUFReader over a file that `validate` accepted."""
    p = Path(path)
    validate(p)
    gguf = require("gguf", "gguf")
    try:
        return gguf.GGUFReader(p)
    except Exception as e:  # the package raises ValueError/struct errors for anything validate did not foresee
        raise BitsmithError(f"{p} is not a readable GGUF file: {type(e).__name__}: {e}") from e


def field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tensor_qweight_or_float(t: Any) -> tuple[Any, torch.Tensor | None]:
    """One GGUF tensor -> (QWeight, None) for a block type bitsmith holds, else (None, float tensor)."""
    import numpy as np

    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))      # GGUF lists ne0 (K) first
    if t.tensor_type.name in gb.BLOCK_TYPES and len(shape) == 2:
        data = torch.from_numpy(np.array(t.data, copy=True)).reshape(shape[0], -1)
        return gb.to_qweight(data, t.tensor_type.name, shape), None
    if t.tensor_type.name in ("F32", "F16"):
        return None, torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)
    gguf = require("gguf", "gguf")
    log.warning("%s: %s is kept as float (bitsmith holds Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K codes)",
                t.name, t.tensor_type.name)
    return None, torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).float().reshape(shape)


def load(path: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """A LoadedModel whose linears (and embedding) hold the GGUF file's own codes and scales."""
    from .. import models
    from ..export.gguf import GGUF_SOURCE_ATTR, _row_permutation
    from ..nn import QuantEmbedding, QuantLinear
    from ..select import set_submodule

    p = Path(path)
    reader = read_gguf(p)
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise BitsmithError(f"importing GGUF supports the architectures {', '.join(SUPPORTED_ARCHS)}; "
                            f"{p} is {arch!r}")
    gguf = require("gguf", "gguf")
    hf_dir = models.convert_gguf(p)                 # config.json + tokenizer (cached, converted once)
    model = models.model_from_config(hf_dir, dtype=dtype)
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    to_hf = {}
    for key in model.state_dict():
        g = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if g is not None:
            to_hf[g] = key
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    loaded: dict[str, tuple[Any, torch.Tensor | None]] = {}
    for t in reader.tensors:
        if t.name not in to_hf:
            raise BitsmithError(f"{p}: tensor {t.name} has no place in a {arch} model "
                                f"({type(model).__name__}); is the file complete and consistent?")
        qw, w = tensor_qweight_or_float(t)
        kind = t.name.split(".")[-2] if t.name.count(".") >= 2 else ""
        if arch == "llama" and kind in ("attn_q", "attn_k") and t.name.endswith(".weight"):
            rows = (qw.shape if qw is not None else w.shape)[0]
            inv = torch.argsort(_row_permutation(rows, n_head if kind == "attn_q" else n_kv))
            if qw is not None:
                from ..export.gguf import permute_rows

                qw = permute_rows(qw, inv)
            else:
                w = w[inv]
        loaded[to_hf[t.name]] = (qw, w)
    own = model.state_dict()
    emb_name = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), None)
    head_key = "lm_head.weight"
    if head_key in own and head_key not in loaded:          # tied head: llama.cpp reuses token_embd
        loaded[head_key] = loaded[f"{emb_name}.weight"]
    missing = sorted(set(own) - set(loaded))
    if missing:
        raise BitsmithError(f"{p} lacks tensors the {arch} model needs: {', '.join(missing[:5])}")
    for key, (qw, w) in loaded.items():
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        if qw is not None and isinstance(mod, nn.Linear) and attr == "weight":
            bias_qw, bias = loaded.get(f"{mod_name}.bias", (None, None))
            set_submodule(model, mod_name, QuantLinear.from_qweight(qw, bias, method="gguf"))
        elif qw is not None and isinstance(mod, nn.Embedding):
            set_submodule(model, mod_name, QuantEmbedding.from_embedding(mod, qw, method="gguf"))
        elif qw is not None:
            raise BitsmithError(f"{p}: quantized tensor for {key} ({type(mod).__name__}) is not a linear or embedding")
        else:
            target = getattr(mod, attr)
            if tuple(target.shape) != tuple(w.shape):
                raise BitsmithError(f"{p}: {key} has shape {tuple(w.shape)}, the model expects {tuple(target.shape)}")
            target.data = w.to(target.dtype)
    cfg.tie_word_embeddings = False      # the head is its own module now (sharing the embedding's codes)
    setattr(model, GGUF_SOURCE_ATTR, str(p))
    tokenizer = models._tokenizer(str(hf_dir), local_only=True)
    return models.LoadedModel(model=model.eval(), tokenizer=tokenizer, name=p.stem, kind="causal-lm",
                              source_dir=hf_dir)
