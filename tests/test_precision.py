"""Mixed precision (the bf16 policy) and gradient checkpointing of the fused path.

bf16 policy (documented in docs/tuner.md): ``half_precision_forward="merged"`` (default) uses one GEMM on
``W0⊙(1+M)`` rounded to bf16 (merged-weight precision); ``"split"`` computes the forward as ``x·W0ᵀ + x·(W0⊙M)ᵀ`` in
bf16, the operations stock PEFT's forward performs in the same dtype. These tests measure both, and a stock-like
dense forward, against an fp64 reference of the same bf16-rounded W0.
"""

from __future__ import annotations


import pytest
import torch
from peft import get_peft_model
from torch import nn

import hira


D, R, N = 256, 8, 128


def _layer_model(mode: str, fused: bool, rms: float):
    """One adapted linear with W0 exactly representable in bf16 and factors scaled so rms(B·A) = rms."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D, D, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(base[0].weight.bfloat16().float())
    torch.manual_seed(1)
    model = get_peft_model(
        base, hira.HiraConfig(r=R, target_modules=["0"], half_precision_forward=mode, fused=fused)
    )
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.hira_B["default"].normal_(0, 1, generator=torch.Generator().manual_seed(2))
        M = layer.hira_B["default"] @ layer.hira_A["default"]
        layer.hira_B["default"].mul_(rms / M.pow(2).mean().sqrt())
    return model


def _x():
    return torch.randn(N, D, generator=torch.Generator().manual_seed(3)).bfloat16()


def _bf16_run(mode, fused, rms):
    model = _layer_model(mode, fused, rms)
    model.base_model.model[0].base_layer.to(torch.bfloat16)  # bf16 base, fp32 adapters: the usual SFT setup
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    g = torch.ones_like(y)
    params = [model.base_model.model[0].hira_A["default"], model.base_model.model[0].hira_B["default"]]
    grads = torch.autograd.grad(y, params, g)
    return y.double(), [gr.double() for gr in grads]


def _fp64_reference(rms):
    model = _layer_model("split", True, rms).double()
    x = _x().double()
    y = model(x)
    params = [model.base_model.model[0].hira_A["default"], model.base_model.model[0].hira_B["default"]]
    grads = torch.autograd.grad(y, params, torch.ones_like(y))
    with torch.no_grad(), model.disable_adapter():
        y0 = model(x)
    return y.detach(), y0, grads


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rms", [1e-3, 1e-2, 1e-1])
def test_bf16_policy_against_fp64(rms):
    y_ref, y0, g_ref = _fp64_reference(rms)
    delta_ref = y_ref - y0
    results = {}
    for name, mode, fused in [("split", "split", True), ("merged", "merged", True), ("stock-like", "split", False)]:
        y, grads = _bf16_run(mode, fused, rms)
        results[name] = {
            "out": _rel(y, y_ref),
            "delta": _rel(y - y0, delta_ref),
            "grad_A": _rel(grads[0], g_ref[0]),
            "grad_B": _rel(grads[1], g_ref[1]),
        }
    print(f"\nrms(M)={rms:g}: " + "; ".join(f"{k}: " + ", ".join(f"{m} {v:.2e}" for m, v in r.items()) for k, r in results.items()))
    # "split" has stock PEFT's numerics (same bf16 GEMMs on W0 and W0⊙M).
    assert abs(results["split"]["out"] - results["stock-like"]["out"]) < 0.02 * results["stock-like"]["out"] + 1e-6
    assert abs(results["split"]["delta"] - results["stock-like"]["delta"]) < 0.05 * results["stock-like"]["delta"] + 1e-6
    # Outputs are at bf16 resolution (2^-8 relative) for every policy.
    for r in results.values():
        assert r["out"] < 2 ** -7
        # Gradients of A and B are computed from W0 ⊙ (gᵀx) in bf16 GEMMs: loose but meaningful agreement.
        assert r["grad_A"] < 2e-2 and r["grad_B"] < 2e-2
    # "merged" loses updates below bf16 resolution of 1 + M, so its visible update is never much better and at
    # most modestly worse than split's.
    assert results["merged"]["delta"] < 1.25 * results["split"]["delta"]


def test_bf16_training_steps_track_fp32():
    """A few AdamW steps under bf16 autocast stay close to the fp32 run for both policies."""
    from hira.models import resolve_model
    from transformers import AutoModelForCausalLM

    path = resolve_model("tiny-llama")
    ids = torch.randint(3, 32000, (4, 24), generator=torch.Generator().manual_seed(0))

    def train(mode, autocast):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = get_peft_model(
            model, hira.HiraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], half_precision_forward=mode)
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.3)
        losses = []
        for _ in range(8):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.float().backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    ref = train("split", False)
    assert ref[-1] < ref[0] - 0.05, ref  # the fp32 run really learns
    for mode in ("split", "merged"):
        losses = train(mode, True)
        # Compare what training achieved: the loss decrease relative to step 0, against fp32's decrease.
        gain_ref, gain = ref[0] - ref, losses[0] - losses
        rel = ((gain - gain_ref).abs().max() / gain_ref[-1]).item()
        print(f"\n{mode}: fp32 {ref.tolist()} bf16 {losses.tolist()} max deviation of the loss decrease {rel:.2%}")
        assert rel < 0.05


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing(reentrant):
    from hira.models import resolve_model
    from transformers import AutoModelForCausalLM

    path = resolve_model("tiny-llama")
    ids = torch.randint(3, 32000, (2, 16), generator=torch.Generator().manual_seed(1))

    def grads(checkpointing, dropout):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model = get_peft_model(
            model,
            hira.HiraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], hira_dropout=dropout),
        )
        model.add_adapter("second", hira.HiraConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False))
        model.base_model.set_adapter(["default", "second"])  # several active adapters
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "hira_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        model.train()
        torch.manual_seed(42)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    for dropout in (0.0, 0.1):
        l0, g0 = grads(False, dropout)
        l1, g1 = grads(True, dropout)
        assert abs(l0 - l1) < 1e-6
        assert g0.keys() == g1.keys() and len(g0) > 0
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["merged", "split"])
def test_fp16_autocast(mode):
    """fp16 autocast runs the same fused path: output at fp16 resolution, fp32 adapter gradients."""
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(64, 64)),
        hira.HiraConfig(r=4, target_modules=["0"], init_weights=False, half_precision_forward=mode),
    )
    x = torch.randn(16, 64)
    y32 = model(x)
    g32 = torch.autograd.grad(y32.sum(), [p for p in model.parameters() if p.requires_grad])
    with torch.autocast("cpu", dtype=torch.float16):
        y = model(x)
    assert y.dtype == torch.float16
    assert _rel(y.double(), y32.double()) < 4 * 2**-11
    g = torch.autograd.grad(y.float().sum(), [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(g, g32):
        assert a.dtype == torch.float32 and _rel(a.double(), b.double()) < 1e-2
