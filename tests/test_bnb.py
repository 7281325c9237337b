"""QHiRA: HiRA on bitsandbytes 8-bit and 4-bit layers (they run on the CPU with bitsandbytes 0.50)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn


bnb = pytest.importorskip("bitsandbytes")

import hira  # noqa: E402
from hira_reference import bnb_dequantized, bnb_quantised_like, rel  # noqa: E402


def _quantised(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(64, 32)
    if kind == "8bit":
        q = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    model = nn.Sequential(q, nn.ReLU(), nn.Linear(32, 4)).to("cpu")  # bitsandbytes quantises on .to(device)
    with torch.no_grad():
        model(torch.zeros(1, 64))  # 8-bit quantises lazily on the first forward
    return model


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_qhira_layer(kind):
    model = _quantised(kind)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_base = model(x)
    peft_model = get_peft_model(model, hira.HiraConfig(r=4, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    assert type(layer).__name__ == ("Linear8bitLt" if kind == "8bit" else "Linear4bit")
    assert type(layer).__module__ == "hira.bnb"
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), y_base, rtol=0, atol=0)  # no-op at init
        layer.hira_B["default"].normal_(0, 1.5)  # ΔW ≈ 0.2·W0

    # Forward = quantised base output + x·(W0 ⊙ B·A)ᵀ with W0 dequantised by bitsandbytes' own public functions (not
    # the tuner's); gradients = autograd through that formula, in fp64.
    A, B = layer.hira_A["default"], layer.hira_B["default"]
    h = peft_model.base_model.model[0](x)
    with torch.no_grad():
        h_base = layer.get_base_layer()(x).double()
    W0 = bnb_dequantized(layer.get_base_layer())
    Ad, Bd = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    ref = h_base + F.linear(x.double(), W0 * (Bd @ Ad))
    assert rel(h, ref) < 1e-6 and rel(h_base, ref) > 0.05
    g = torch.randn_like(h)
    for a, b in zip(torch.autograd.grad(h, [A, B], g), torch.autograd.grad(ref, [Ad, Bd], g.double())):
        assert rel(a, b) < 1e-5

    # Merge = W0 + W0 ⊙ B·A quantised once (compared with quantising the fp64 reference the same way: far tighter
    # than the adapter's own effect); unmerge restores the quantised W0 exactly.
    with torch.no_grad():
        y = peft_model(x)
        target = W0 * (1 + Bd.detach() @ Ad.detach())
        peft_model.merge_adapter()
        got, expect = bnb_dequantized(layer.get_base_layer()), bnb_quantised_like(layer.get_base_layer(), target)
        assert rel(got, expect) < 0.01 < 0.05 < rel(expect, bnb_quantised_like(layer.get_base_layer(), W0))
        peft_model.unmerge_adapter()
        torch.testing.assert_close(peft_model(x), y, rtol=0, atol=0)
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(x), y_base, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_qhira_trains_only_adapters(kind):
    peft_model = get_peft_model(_quantised(kind), hira.HiraConfig(r=4, target_modules=["0"]))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.dtype.is_floating_point}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    target = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(peft_model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in peft_model.named_parameters():
        if n in before:
            assert torch.equal(before[n], p.detach()) != ("hira_" in n), n


def test_qhira_on_a_4bit_transformers_model():
    """The QHiRA recipe path: a transformers causal LM loaded in 4 bit, then HiRA on its projections."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hira.models import resolve_model

    path = resolve_model("tiny-llama")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"})
    peft_model = get_peft_model(model, hira.HiraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layers = [m for m in peft_model.modules() if type(m).__module__ == "hira.bnb"]
    assert len(layers) == 2 * model.config.num_hidden_layers
    ids = torch.tensor([[1, 450, 7483, 310, 3444, 338]])
    # Training mode, as in the recipe: in eval mode bitsandbytes' own AVX512-BF16 CPU path repacks the *unadapted*
    # 4-bit layers and needs out_features % 32 == 0, which this tiny model (hidden 16) does not have.
    peft_model.train()
    out = peft_model(ids, labels=ids)
    out.loss.backward()
    assert all(m.hira_A["default"].grad is not None for m in layers)
