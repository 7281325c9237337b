"""One test per defect found in the tuner (issue 8 and what its test matrix found), each failing on the code before
its fix (checked against commit 751a9e4), plus three guards of behaviour that was right but untested (config edits
validated at injection, the randomized-SVD branch, every factor gradient of two adapters). Public API only, as a
user meets the defect; references from the math (tests/hira_reference.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

import hira
from hira_reference import bnb_dequantized, bnb_quantised_like, rel, truncated_svd


def _linear_model(dtype=torch.float32, d_in=12, d_out=10, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).to(dtype)


def _randomise(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


# ------------------------------------------------------------------------------------------------ HiRA-SB


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sb_on_a_half_precision_model_trains_only_the_core(dtype, tmp_path):
    """PEFT's fp32 upcast of the adapter re-created HiRA-SB's frozen B and A as trainable parameters."""
    model = get_peft_model(_linear_model(dtype), hira.HiraConfig(r=3, target_modules=["0"], variant="sb"))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable.values()) == [9] and all("hira_R" in n for n in trainable), trainable
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_linear_model(dtype), tmp_path, is_trainable=True)
    assert [p.numel() for p in loaded.parameters() if p.requires_grad] == [9]


# ------------------------------------------------------------------------------------------------ precision


def test_bf16_model_with_fp32_adapters_without_autocast_has_fp32_gradients():
    """The adapter gradients were computed in the input's bf16 (relative error ~3e-3); stock PEFT's are fp32."""
    model = get_peft_model(_linear_model(torch.bfloat16, 64, 32), hira.HiraConfig(r=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    _randomise(model, 0.2)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = model(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    A, B = layer.hira_A["default"], layer.hira_B["default"]
    assert A.dtype == torch.float32
    gA, gB = torch.autograd.grad(y, [A, B], g)
    Ad, Bd = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    W = layer.base_layer.weight.double()
    ref = F.linear(x.double(), W * (1 + Bd @ Ad), layer.base_layer.bias.double())
    rA, rB = torch.autograd.grad(ref, [Ad, Bd], g.double())
    assert rel(gA, rA) < 1e-5 and rel(gB, rB) < 1e-5, (rel(gA, rA), rel(gB, rB))


def test_lowrank_modulator_keeps_fp32_precision_on_a_bf16_model():
    """PEFT's device move cast the SVD factors of the fixed modulator to bf16 (then back up to fp32)."""
    model = get_peft_model(
        _linear_model(torch.bfloat16, 64, 32), hira.HiraConfig(r=4, target_modules=["0"], modulator="lowrank")
    )
    layer = model.base_model.model[0]
    U, V = layer.hira_mod_U["default"], layer.hira_mod_V["default"]
    assert U.dtype == torch.float32
    R = truncated_svd(layer.base_layer.weight.double(), 8)
    assert rel(U.double() @ V.double(), R) < 1e-5


def test_safe_merge_detects_an_overflow_of_the_weight_dtype():
    """Finiteness was checked before the cast to fp16, so a merged weight overflowing to inf passed."""
    model = get_peft_model(_linear_model(torch.float16, 4, 4), hira.HiraConfig(r=1, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.fill_(1000.0)
        layer.hira_A["default"].fill_(10.0)
        layer.hira_B["default"].fill_(10.0)  # W0 ⊙ (1 + 100) = 101000 > fp16 max 65504
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="Non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


# ------------------------------------------------------------------------------------------------ config


def test_config_edited_after_construction_is_saved_as_what_it_is(tmp_path):
    """peft_type was fixed at construction, so an edited modulator saved as plain HIRA (stock PEFT then loads it as
    plain HiRA with wrong outputs)."""
    cfg = hira.HiraConfig(r=4, target_modules=["0"])
    cfg.modulator = "random"
    model = get_peft_model(_linear_model(), cfg)
    model.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HIRA_FAMILY" and saved["modulator"] == "random"


def test_config_edited_after_construction_saved_directly(tmp_path):
    """The same through ``HiraConfig.save_pretrained`` (no model involved): the type is derived when saving."""
    import json

    cfg = hira.HiraConfig(r=4, target_modules=["0"])
    cfg.variant, cfg.hilora_r2 = "hilora", 2
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "HIRA_FAMILY"
    cfg.bhra_blocks = 0  # an invalid edit is refused when saving, not written
    with pytest.raises(ValueError, match="bhra_blocks"):
        cfg.save_pretrained(tmp_path / "bad")


def test_config_edited_after_construction_is_validated_when_applied():
    """Guard: an edited field is validated again when the adapter is created."""
    cfg = hira.HiraConfig(r=4, target_modules=["0"], variant="bhra", bhra_blocks=2)
    cfg.bhra_blocks = 3  # r=4 is not divisible by 3
    with pytest.raises(ValueError, match="divisible by bhra_blocks=3"):
        get_peft_model(_linear_model(torch.float32, 12, 9), cfg)


# ------------------------------------------------------------------------------------------------ runtime options


def test_runtime_options_stay_per_adapter():
    """``fused``/``half_precision_forward`` were layer-wide: the last adapter added overwrote the others'."""
    model = get_peft_model(_linear_model(torch.float32, 64, 96, bias=False), hira.HiraConfig(r=4, target_modules=["0"]))
    model.add_adapter("other", hira.HiraConfig(r=4, target_modules=["0"], fused=False))
    _randomise(model)
    model.base_model.set_adapter("default")
    x = torch.randn(5, 64, requires_grad=True)
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    assert sum(saved) == 0, "the fused default adapter kept a dense matrix for backward"


# ------------------------------------------------------------------------------------------------ embeddings


class _Scaled(nn.Embedding):
    def __init__(self):
        super().__init__(20, 8)
        self.register_buffer("embed_scale", torch.tensor(4.0), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def test_embedding_with_embed_scale_merged_equals_unmerged():
    """Gemma's scaled embedding: the adapter part was added unscaled, so merging changed the output."""
    model = get_peft_model(nn.Sequential(_Scaled()), hira.HiraConfig(r=2, target_modules=["0"]))
    _randomise(model)
    ids = torch.tensor([[1, 5, 7, 19]])
    with torch.no_grad():
        y = model(ids)
        model.merge_adapter()
        torch.testing.assert_close(model(ids), y, rtol=1e-6, atol=1e-6)


def test_embedding_max_norm_is_refused():
    """max_norm renormalised the adapter's own factor in place on every forward (and cannot match a merge)."""
    with pytest.raises(ValueError, match="max_norm"):
        get_peft_model(nn.Sequential(nn.Embedding(20, 8, max_norm=1.0)), hira.HiraConfig(r=2, target_modules=["0"]))


def test_embedding_sparse_trains():
    """sparse=True made the factor lookup produce sparse gradients and backward crashed."""
    model = get_peft_model(nn.Sequential(nn.Embedding(20, 8, sparse=True)), hira.HiraConfig(r=2, target_modules=["0"]))
    _randomise(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(torch.tensor([[1, 2, 2, 3]])).pow(2).sum()
    loss.backward()
    opt.step()
    assert all(not p.grad.is_sparse for p in model.parameters() if p.requires_grad)


def test_embedding_subclass_with_another_forward_is_refused():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    with pytest.raises(ValueError, match="not weight"):
        get_peft_model(nn.Sequential(Shifted(20, 8)), hira.HiraConfig(r=2, target_modules=["0"]))


# ------------------------------------------------------------------------------------------------ convolutions


@pytest.mark.parametrize("kernel", [(1, 1, 3), (1, 1, 1)])
def test_conv3d_kernel_with_unit_dimensions(kernel):
    """Stock PEFT's B·A for a conv kernel took a 1×1 shortcut on dims 2:4 and failed for (1, 1, k) Conv3d kernels."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Conv3d(3, 5, kernel)), hira.HiraConfig(r=2, target_modules=["0"]))
    _randomise(model)
    layer = model.base_model.model[0]
    x = torch.randn(2, 3, 3, 3, 4)
    A, B = layer.hira_A["default"].double(), layer.hira_B["default"].double()
    M = torch.einsum("or,r...->o...", B.reshape(5, 2), A)
    W = layer.base_layer.weight.double()
    ref = F.conv3d(x.double(), W * (1 + M), layer.base_layer.bias.double())
    assert rel(model(x), ref) < 1e-5


# ------------------------------------------------------------------------------------------------ modulators


def test_smooth_modulator_averages_layers_not_experts():
    """A mixture-of-experts name (layers.1.experts.0.proj) made the smooth modulator average over *experts*."""

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([Expert() for _ in range(2)])

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])

        def forward(self, x):
            return sum(e.proj(x) for b in self.layers for e in b.experts)

    torch.manual_seed(0)
    base = MoE()
    W = {(i, j): base.layers[i].experts[j].proj.weight.detach().double().clone() for i in range(3) for j in range(2)}
    model = get_peft_model(base, hira.HiraConfig(r=2, target_modules=["proj"], modulator="smooth"))
    inner = model.base_model.model
    for i in range(3):
        for j in range(2):
            S = inner.layers[i].experts[j].proj.hira_mod_S["default"].double()
            expect = sum(W[(k, j)] for k in (i - 1, i, i + 1) if 0 <= k < 3) / len([k for k in (i - 1, i, i + 1)
                                                                                   if 0 <= k < 3])
            assert rel(S, expect) < 1e-6, (i, j)


def test_lowrank_modulator_randomized_svd_branch():
    """Guard: layers above 256 rows and columns take the randomized range finder (no test reached it before); it
    must still give W0's truncated SVD, also with a flat spectral tail where the power iterations matter."""
    g = torch.Generator().manual_seed(0)
    d, n, v = 300, 320, 4
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.ones(min(d, n))
    s[:v] = torch.tensor([10.0, 9.0, 8.0, 7.0])  # a gap after the top v, a flat tail (power iterations matter)
    W = (U[:, : len(s)] * s) @ V[:, : len(s)].t()
    lin = nn.Linear(n, d, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    model = get_peft_model(nn.Sequential(lin), hira.HiraConfig(r=2, target_modules=["0"], modulator="lowrank",
                                                               modulator_rank=v))
    layer = model.base_model.model[0]
    R = layer.hira_mod_U["default"].double() @ layer.hira_mod_V["default"].double()
    assert rel(R, truncated_svd(W, v)) < 1e-4


# ------------------------------------------------------------------------------------------------ bitsandbytes


bnb = pytest.importorskip("bitsandbytes")


def _bnb(kind, d_in=64, d_out=32):
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out)
    if kind == "8bit":
        q = bnb.nn.Linear8bitLt(d_in, d_out, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(d_in, d_out, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    model = nn.Sequential(q).to("cpu")
    if kind == "8bit":
        with torch.no_grad():
            model(torch.zeros(1, d_in))
    return model


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_bnb_second_merge_modulates_the_original_weight(kind):
    """Merging a second adapter used the already merged weight as W0: W1 + W1⊙M2 instead of W0 + W0⊙M1 + W0⊙M2."""
    model = get_peft_model(_bnb(kind), hira.HiraConfig(r=4, target_modules=["0"]))
    model.add_adapter("other", hira.HiraConfig(r=4, target_modules=["0"]))
    _randomise(model, 0.4)
    layer = model.base_model.model[0]
    W0 = bnb_dequantized(layer.get_base_layer())
    M = {a: layer.hira_B[a].double() @ layer.hira_A[a].double() for a in ("default", "other")}
    target = W0 * (1 + M["default"] + M["other"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(adapter_names=["default"])
        layer.merge(adapter_names=["other"])
    got = bnb_dequantized(layer.get_base_layer())
    expect = bnb_quantised_like(layer.get_base_layer(), target)  # W0 + ΔW1 + ΔW2 quantised once
    wrong = bnb_quantised_like(layer.get_base_layer(), W0 * (1 + M["default"]) * (1 + M["other"]))  # the defect
    assert rel(got, expect) < 0.02 < rel(wrong, expect), (rel(got, expect), rel(wrong, expect))


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs only")
def test_bnb_4bit_eval_mode_on_an_avx512_bf16_cpu():
    """bitsandbytes repacked the 4-bit weight in place in eval mode; the adapter then dequantised the packed bytes as
    if they were standard ones (output error ~0.1)."""
    model = _bnb("4bit")
    W0 = bnb_dequantized(model[0])
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    peft_model = get_peft_model(model, hira.HiraConfig(r=4, target_modules=["0"]))
    _randomise(peft_model, 0.3)
    layer = peft_model.base_model.model[0]
    peft_model.eval()
    with torch.no_grad():
        y = peft_model(x)
        with peft_model.disable_adapter():
            y0 = peft_model(x).double()
    M = layer.hira_B["default"].double() @ layer.hira_A["default"].double()
    assert rel(bnb_dequantized(layer.get_base_layer()), W0) < 1e-7
    assert rel(y, y0 + F.linear(x.double(), W0 * M)) < 1e-5


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs only")
def test_bnb_4bit_weight_repacked_before_wrapping_is_refused():
    model = _bnb("4bit").eval()
    with torch.no_grad():
        model(torch.randn(6, 64))
    assert model[0].weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match="Apply HiRA before the model's first eval-mode forward"):
        get_peft_model(model, hira.HiraConfig(r=4, target_modules=["0"]))


# ------------------------------------------------------------------------------------------------ several adapters


def test_two_adapters_all_factor_gradients():
    """Guard: the several-adapters test only checked hira_B, so a wrong gradient of a second adapter's A went
    unnoticed."""
    model = get_peft_model(_linear_model(torch.float32, 10, 20), hira.HiraConfig(r=2, target_modules=["0"]))
    model.add_adapter("other", hira.HiraConfig(r=3, target_modules=["0"]))
    _randomise(model)
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model[0]
    x = torch.randn(7, 10)
    ps = [layer.hira_A["default"], layer.hira_B["default"], layer.hira_A["other"], layer.hira_B["other"]]
    assert all(p.requires_grad for p in ps)
    y = model(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, ps, g)
    leaves = [p.detach().double().requires_grad_() for p in ps]
    W = layer.base_layer.weight.double()
    M = leaves[1] @ leaves[0] + leaves[3] @ leaves[2]
    ref = F.linear(x.double(), W * (1 + M), layer.base_layer.bias.double())
    for gr, rg in zip(grads, torch.autograd.grad(ref, leaves, g.double())):
        assert rel(gr, rg) < 1e-5
    copy.deepcopy(model)  # the model stays copyable with per-adapter runtime state
