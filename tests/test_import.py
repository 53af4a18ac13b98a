"""Importers: corrupt and hostile GGUF files are refused with one line (before anything large is allocated),
unsupported GGUF architectures name the supported ones, and GPTQ-format checkpoints (packed the way
GPTQModel / AutoGPTQ document it, act-order included) come in with their exact codes."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from bitsmith import cli  # noqa: E402
from bitsmith.errors import BitsmithError  # noqa: E402
from bitsmith.importers.gguf import load, validate  # noqa: E402
from bitsmith.importers.gptq import gptq_to_qweight  # noqa: E402
from bitsmith.primitives import dequantize_weight  # noqa: E402

from .test_export_gguf import tiny_bpe_llama  # noqa: E402,F401 - the shared fixture


def _small_gguf(path, arch: str = "llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_array("test.arr", [1, 2, 3, 4])
    w.add_string("test.str", "hello")
    rng = np.random.default_rng(0)
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32),
                                                              gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _patch(path, offset: int, data: bytes):
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    path.write_bytes(bytes(b))


def _refused(path, match: str):
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(BitsmithError, match=match):
        validate(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 50e6     # nothing near the claimed size was allocated


def test_valid_file_passes(tmp_path):
    table = validate(_small_gguf(tmp_path / "ok.gguf"))
    assert [t["name"] for t in table] == ["blk.0.ffn_up.weight", "output_norm.weight"]
    assert table[0]["nbytes"] == 4 * 2 * 34


def test_bad_magic(tmp_path):
    p = _small_gguf(tmp_path / "m.gguf")
    _patch(p, 0, b"GGML")
    _refused(p, "not a GGUF file")


def test_truncated_tensor_data(tmp_path):
    p = _small_gguf(tmp_path / "t.gguf")
    p.write_bytes(p.read_bytes()[:-100])
    _refused(p, "past the end of the file")


def test_truncated_header(tmp_path):
    p = _small_gguf(tmp_path / "h.gguf")
    p.write_bytes(p.read_bytes()[:60])
    _refused(p, "truncated or corrupt")


@pytest.mark.parametrize("offset,what", [(8, "tensor count"), (16, "key count")])
def test_absurd_counts(tmp_path, offset, what):
    p = _small_gguf(tmp_path / "c.gguf")
    _patch(p, offset, struct.pack("<Q", 1 << 62))
    _refused(p, "cannot fit")


def test_absurd_array_and_string_lengths(tmp_path):
    p = _small_gguf(tmp_path / "a.gguf")
    raw = p.read_bytes()
    i = raw.index(b"test.arr") + len(b"test.arr") + 4 + 4          # value type, item type, then the count
    _patch(p, i, struct.pack("<Q", 1 << 60))
    _refused(p, "claims")
    p = _small_gguf(tmp_path / "s.gguf")
    i = p.read_bytes().index(b"test.str") + len(b"test.str") + 4    # value type, then the string length
    _patch(p, i, struct.pack("<Q", 1 << 61))
    _refused(p, "truncated or corrupt")


def test_bad_tensor_entries(tmp_path):
    p = _small_gguf(tmp_path / "d.gguf")
    name = b"blk.0.ffn_up.weight"
    i = p.read_bytes().index(name) + len(name)
    _patch(p, i, struct.pack("<I", 9))
    _refused(p, "9 dimensions")
    p = _small_gguf(tmp_path / "e.gguf")
    i = p.read_bytes().index(name) + len(name) + 4 + 16             # dims count, two dims, then the type
    _patch(p, i, struct.pack("<I", 999))
    _refused(p, "unknown type 999")


def test_unsupported_gguf_architecture_and_cli(tmp_path, capsys):
    p = _small_gguf(tmp_path / "g.gguf", arch="gpt2")
    with pytest.raises(BitsmithError, match="llama, qwen2.*'gpt2'"):
        load(p)
    bad = _small_gguf(tmp_path / "bad.gguf")
    bad.write_bytes(b"NOPE" + bad.read_bytes()[4:])
    out = tmp_path / "out.gguf"
    assert cli.main(["export", str(bad), "--format", "gguf", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a GGUF file" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


# ---- GPTQ ---------------------------------------------------------------------------------------------
def _pack_gptq(q: np.ndarray, z: np.ndarray, bits: int):
    """GPTQModel / AutoGPTQ v1 layout, written out directly: q (K, N) packed along K, z - 1 (G, N) along N."""
    per = 32 // bits
    k, n = q.shape
    qweight = np.zeros((k // per, n), dtype=np.uint32)
    for j in range(per):
        qweight |= q[j::per].astype(np.uint32) << np.uint32(bits * j)
    zs = (z - 1).astype(np.uint32) & np.uint32((1 << bits) - 1)
    qzeros = np.zeros((z.shape[0], n // per), dtype=np.uint32)
    for j in range(per):
        qzeros |= zs[:, j::per] << np.uint32(bits * j)
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def _gptq_layer(n: int, k: int, g: int, bits: int, act_order: bool, seed: int):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << bits, (k, n))
    z = rng.integers(1, 1 << bits, (k // g, n))
    scales = (rng.random((k // g, n)) * 0.02 + 1e-3).astype(np.float16)
    g_idx = np.arange(k) // g
    if act_order:
        g_idx = g_idx[rng.permutation(k)]
    qweight, qzeros = _pack_gptq(q, z, bits)
    # the documented dequantization, straight from the unpacked arrays
    w = scales.astype(np.float32)[g_idx, :] * (q - z[g_idx, :]).astype(np.float32)        # (K, N)
    return qweight, qzeros, torch.from_numpy(scales), torch.from_numpy(g_idx.astype(np.int32)), w.T


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_tensors_to_qweight_exact(bits, act_order):
    qweight, qzeros, scales, g_idx, w = _gptq_layer(48, 128, 32, bits, act_order, seed=bits)
    qw = gptq_to_qweight(qweight, qzeros, scales, g_idx, bits=bits, group_size=32, sym=False)
    assert (qw.perm is not None) == act_order
    assert np.array_equal(dequantize_weight(qw).numpy(), w)


def test_gptq_bad_g_idx_and_bits():
    qweight, qzeros, scales, g_idx, _ = _gptq_layer(16, 64, 32, 4, False, seed=0)
    with pytest.raises(BitsmithError, match="groups of 32"):
        gptq_to_qweight(qweight, qzeros, scales, torch.zeros(64, dtype=torch.int32), bits=4, group_size=32, sym=False)
    with pytest.raises(BitsmithError, match="3 bits"):
        gptq_to_qweight(qweight, qzeros, scales, g_idx, bits=3, group_size=32, sym=False)


def test_gptq_checkpoint_imports_and_exports_to_gguf(tiny_bpe_llama, tmp_path, monkeypatch):
    """A GPTQ checkpoint of the tiny Llama: linears come in exactly; exported as GGUF, the group-32 layers
    repack (codes and scales exact) and the act-order layer is re-encoded with a warning."""
    from safetensors.torch import load_file, save_file

    from bitsmith.export import export
    from bitsmith.importers import load_for_export

    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "gptq"
    d.mkdir()
    for f in tiny_bpe_llama.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tiny_bpe_llama / "model.safetensors"))
    want = {}
    for i, key in enumerate(sorted(k for k in state if k.endswith("_proj.weight"))):
        n, k = state[key].shape
        prefix = key[: -len(".weight")]
        act = prefix.endswith("layers.1.mlp.up_proj")
        qweight, qzeros, scales, g_idx, w = _gptq_layer(n, k, 32, 4, act, seed=i)
        state.pop(key)
        state.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales,
                      f"{prefix}.g_idx": g_idx})
        want[prefix] = w
    save_file(state, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                  "desc_act": True, "checkpoint_format": "gptq"}
    (d / "config.json").write_text(json.dumps(cfg))
    lm = load_for_export(str(d))
    for prefix, w in want.items():
        assert np.array_equal(lm.model.get_submodule(prefix).dequantize().numpy(), w), prefix
    s = export(lm, "gguf", tmp_path / "gptq.gguf", type="Q4_1")
    assert s["re_encoded"] == 1 and "layers.1.mlp.up_proj" in " ".join(s["warnings"])
    assert s["tensors"]["blk.0.ffn_down.weight"]["path"] == "lossless"
