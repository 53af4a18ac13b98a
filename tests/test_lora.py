"""QLoRA: adapters on a frozen quantized base (bitsmith/lora.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsmith import BitsmithError, Recipe, Scheme, quantize
from bitsmith.lora import (FrozenQuantMatmul, LoraConfig, LoraLinear, add_lora, finetune, load_adapters,
                           lora_parameters, merge, save_adapters, trainable_count)
from bitsmith.nn import QuantLinear

NF4 = Recipe(method="nf4", scheme=Scheme(bits=4, group_size=64, grid="nf4"))


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    quantize(m, NF4)
    return m


def test_starts_at_the_base_and_trains_only_adapters():
    m = toy()
    x = torch.randn(16, 64)
    before = m(x)
    frozen = {k: v.clone() for k, v in m.state_dict().items()}
    names = add_lora(m, LoraConfig(rank=4))
    assert names == ["0", "2"]
    assert torch.equal(m(x), before)                        # B = 0: exactly the base
    assert trainable_count(m) == 4 * (64 + 128) + 4 * (128 + 32)
    target = torch.randn(16, 32)
    opt = torch.optim.Adam(lora_parameters(m), 1e-2)
    first = None
    for _ in range(40):
        loss = (m(x) - target).pow(2).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    for k, v in frozen.items():                             # the packed base never moved
        assert torch.equal(_base_tensor(m, k), v)


def _base_tensor(m: nn.Module, key: str) -> torch.Tensor:
    mod, _, attr = key.rpartition(".")
    sub = m.get_submodule(mod)
    sub = sub.base if isinstance(sub, LoraLinear) else sub
    return getattr(sub, attr)


def test_frozen_matmul_gradient_and_no_dense_weight_saved():
    m = toy()
    lin = m[0]
    w = lin.dequantize()
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = FrozenQuantMatmul.apply(x, lin)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(F.linear(x2, w).square().sum(), x2)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-6)
    assert w.numel() not in saved                            # the dense weight is rebuilt, not kept


def test_save_load_adapters_and_merge(tmp_path):
    m = toy()
    add_lora(m, LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        for p in lora_parameters(m):
            p.normal_(0, 0.05)
    x = torch.randn(8, 64)
    y = m(x)
    out = save_adapters(m, tmp_path / "ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    with pytest.raises(BitsmithError, match="--overwrite"):
        save_adapters(m, tmp_path / "ad")
    fresh = toy()
    load_adapters(fresh, out)
    assert torch.equal(fresh(x), y)
    with torch.no_grad():
        report = merge(m)
    assert all(isinstance(m[i], QuantLinear) and not isinstance(m[i], LoraLinear) for i in (0, 2))
    assert m[0].method == "nf4" and m[0].scheme == fresh[0].base.scheme
    assert all(r["sqnr_db"] > 15 for r in report)           # NF4 of the merged weight
    merged = m(x)
    assert (merged - y).norm() / y.norm() < 0.2             # the update survives re-quantization
    assert not any(isinstance(mod, LoraLinear) for mod in m.modules())


def test_bad_input():
    plain = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(BitsmithError, match="quantize it first"):
        add_lora(plain)
    m = toy()
    add_lora(m)
    with pytest.raises(BitsmithError, match="already has LoRA"):
        add_lora(m)
    with pytest.raises(BitsmithError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(BitsmithError, match="training windows"):
        finetune(m, torch.zeros(4, dtype=torch.long), steps=1)


def test_finetune_tiny_llama_lowers_loss(tiny_llama):
    from bitsmith.lora import causal_lm_loss

    from bitsmith.models import load_model

    model = load_model(str(tiny_llama)).model
    quantize(model, NF4)
    add_lora(model, LoraConfig(rank=8, seed=1))
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (8, 32))
    with torch.no_grad():
        before = float(causal_lm_loss(model, ids))
    losses = finetune(model, ids, steps=30, batch_size=8, lr=5e-3)
    with torch.no_grad():
        after = float(causal_lm_loss(model, ids))
    assert after < before - 0.1 and len(losses) == 30


@pytest.mark.slow
def test_qlora_smollm2_lowers_heldout_perplexity(smollm2, eval_text):
    """A few adapter steps on the calibration part of the default text lower the held-out perplexity of
    the NF4 base (a small slice of benchmarks/qlora.py, which measures the full-size run)."""
    import copy

    from bitsmith.evaluate import perplexity
    from bitsmith.models import calibration_samples, load_text
    from bitsmith.size import size_report

    model = copy.deepcopy(smollm2.model)
    quantize(model, NF4)
    assert abs(size_report(model)["quantized_bpw"] - 4.127) < 1e-3
    ppl = lambda: perplexity(model, smollm2.tokenizer, eval_text, seq_len=256, max_tokens=512)["ppl"]  # noqa: E731
    with torch.no_grad():
        base = ppl()
    add_lora(model, LoraConfig(rank=8, alpha=16))
    windows = calibration_samples(smollm2.tokenizer, load_text(None)[0], n_samples=16, seq_len=128)
    finetune(model, windows, steps=8, batch_size=2, lr=2e-3)
    with torch.no_grad():
        tuned = ppl()
    assert tuned < 0.97 * base, (base, tuned)
