"""Module swap, selection, memory that really shrinks, save -> load identical outputs, atomic writes."""

import json
import os

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith import BitsmithError, Recipe, Scheme
from bitsmith.nn import QuantConv2d, QuantEmbedding, QuantLinear
from bitsmith.select import select_modules
from bitsmith.size import memory_bytes, safetensors_header_bytes, size_report

from .helpers import sqnr_db


class Toy(nn.Module):
    """Embedding, conv, linears and a head tied to the embedding, like a small LM with a vision stem."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.ModuleDict({"up": nn.Linear(64, 96), "down": nn.Linear(96, 64, bias=False)})
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, img):
        h = self.emb(ids)
        h = h + self.block["down"](torch.relu(self.block["up"](h)))
        return self.head(h), self.conv(img)


def toy():
    torch.manual_seed(0)
    return Toy().eval()


INPUTS = (torch.randint(0, 100, (2, 5)), torch.randn(1, 3, 8, 8))


def test_default_selection_skips_embeddings_and_tied_head():
    names = [n for n, _ in select_modules(toy(), ("*",), ("lm_head",))]
    assert names == ["conv", "block.up", "block.down"]


def test_patterns_glob_regex_and_explicit_embedding():
    m = toy()
    assert [n for n, _ in select_modules(m, ("block.*",), ())] == ["block.up", "block.down"]
    assert [n for n, _ in select_modules(m, ("re:^block\\.(up|down)$",), ("*down",))] == ["block.up"]
    assert [n for n, _ in select_modules(m, ("emb", "head"), ())] == ["emb", "head"]
    with pytest.raises(BitsmithError, match="matched no"):
        select_modules(m, ("nothing_here",), ())
    with pytest.raises(BitsmithError, match="regular expression"):
        select_modules(m, ("re:(",), ())


def test_quantize_swaps_modules_and_memory_shrinks():
    m = toy()
    before = memory_bytes(m)
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=4, group_size=32)))
    assert isinstance(m.conv, QuantConv2d) and isinstance(m.block["up"], QuantLinear)
    assert isinstance(m.emb, nn.Embedding) and m.head.weight is m.emb.weight
    assert not any(isinstance(p, torch.Tensor) and p.dim() == 2 for p in m.block["up"].parameters())
    assert memory_bytes(m) < before
    with pytest.raises(BitsmithError, match="already quantized"):
        bitsmith.quantize(m, Recipe())


def test_outputs_close_to_float_at_8_bits():
    m, ref = toy(), toy()
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=8, group_size=None), keep_dtype=None))
    for a, b in zip(ref(*INPUTS), m(*INPUTS)):
        assert sqnr_db(a.detach(), b.detach()) > 35


@pytest.mark.parametrize("scheme", [Scheme(bits=4, group_size=32), Scheme(bits=3, group_size=None, symmetric=True),
                                    Scheme(bits=4, group_size=16, grid="nf4"), Scheme(bits=2, group_size=24)])
def test_save_load_identical_outputs_and_exact_size(tmp_path, scheme):
    m = toy()
    bitsmith.quantize(m, Recipe(scheme=scheme, targets=("*", "emb")))
    assert isinstance(m.emb, QuantEmbedding)
    out = m(*INPUTS)
    d = bitsmith.save(m, tmp_path / "q")
    loaded = bitsmith.load(d, model=Toy())
    for a, b in zip(out, loaded(*INPUTS)):
        assert torch.equal(a, b)
    # The file is exactly the accounted tensor bytes plus the safetensors header.
    f = d / "model.safetensors"
    assert os.path.getsize(f) == size_report(m)["payload_bytes"] + safetensors_header_bytes(f)
    cfg = json.loads((d / "quantization_config.json").read_text())
    assert set(cfg["modules"]) == {"emb", "conv", "block.up", "block.down"}


def test_tied_head_saved_once_and_retied(tmp_path):
    m = toy()
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=4, group_size=32)))
    d = bitsmith.save(m, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "emb.weight" in keys and "head.weight" not in keys
    loaded = bitsmith.load(d, model=Toy())
    assert loaded.head.weight is loaded.emb.weight


def test_keep_dtype_stored_at_16_bits(tmp_path):
    m = toy()
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=4, group_size=32)))
    d = bitsmith.save(m, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert f.get_tensor("emb.weight").dtype == torch.float16
        assert f.get_tensor("block.up.qcodes").dtype == torch.uint8


def test_existing_output_untouched_without_overwrite(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    m = toy()
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=4, group_size=32)))
    with pytest.raises(BitsmithError, match="--overwrite"):
        bitsmith.save(m, out)
    assert os.listdir(out) == ["keep.txt"]
    bitsmith.save(m, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]          # no temp or backup dirs left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    m = toy()
    bitsmith.quantize(m, Recipe(scheme=Scheme(bits=4, group_size=32)))
    d = bitsmith.save(m, tmp_path / "q")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(BitsmithError, match="safetensors"):
        bitsmith.load(d, model=Toy())
    with pytest.raises(BitsmithError, match="not a bitsmith checkpoint"):
        bitsmith.load(tmp_path, model=Toy())


def test_nan_weight_raises_naming_the_module():
    m = toy()
    with torch.no_grad():
        m.block["up"].weight[3, 3] = float("nan")
    with pytest.raises(BitsmithError, match=r"block\.up\.weight"):
        bitsmith.quantize(m, Recipe(scheme=Scheme(bits=4, group_size=32)))


def test_cast_methods_store_16_bit(tmp_path):
    m = toy()
    bitsmith.quantize(m, Recipe(method="bf16"))
    assert size_report(m)["bits_per_weight"] == pytest.approx(16.0)


def test_recipe_yaml_round_trip_and_unknown_keys(tmp_path):
    r = Recipe(method="rtn", scheme=Scheme(bits=3, group_size=None), ignore=("lm_head", "re:.*gate.*"),
               method_args={"mse": True})
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert Recipe.from_yaml(p) == r
    p.write_text("method: rtn\nscheme: {bits: 4, groupsize: 64}\nbogus: 1\n")
    with pytest.raises(BitsmithError, match="bogus"):
        Recipe.from_yaml(p)
    p.write_text("method: rtn\nscheme: {bits: 4, groupsize: 64}\n")
    with pytest.raises(BitsmithError, match="groupsize"):
        Recipe.from_yaml(p)
    p.write_text("scheme: {bits: 4, group_size: -1}\n")
    assert Recipe.from_yaml(p).scheme.group_size is None


def test_bits_per_weight_ignores_non_persistent_kernel_caches():
    """A kernel may cache a repacked layout on the module; it is not stored, so bits per weight must not move."""
    model = nn.Sequential(nn.Linear(64, 32))
    bitsmith.quantize(model, Recipe(scheme=Scheme(bits=4, group_size=32)))
    before = size_report(model)["quantized_bpw"]
    model[0].register_buffer("_cache_demo", torch.zeros(32, 64), persistent=False)
    after = size_report(model)
    assert after["quantized_bpw"] == before and after["memory_bytes"] > 0
