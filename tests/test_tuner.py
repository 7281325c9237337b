"""The HiRA tuner over every layer type, in the style of PEFT's parametrised custom-model tables.

Each case builds a tiny model, adapts it with ``hira.HiraConfig`` and checks the properties the tuner promises:
no-op at init, the dense formula ``W0 + W0 ⊙ M`` for nonzero factors, gradients equal to plain autograd through the
dense formula (fused and unfused), only adapter weights train, merge/unmerge/merge_and_unload, several adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import hira


# ----------------------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 6, bias=bias)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class EmbConv1D(nn.Module):
    """Embedding + transformers Conv1D (GPT-2 style, weight stored fan_in × fan_out)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.conv1d = Conv1D(8, 12)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin0(self.relu(self.conv1d(self.emb(x))))


class ConvNet(nn.Module):
    def __init__(self, dim):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.conv = conv(3, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.dim = dim
        self.lin0 = nn.Linear(5, 4)

    def forward(self, x):
        h = self.relu(self.conv(x))
        return self.lin0(h.flatten(2).mean(-1))


def _input(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(7, 10, generator=g)
    if name == "emb_conv1d":
        return torch.randint(0, 50, (3, 5), generator=g)
    dim = int(name[-2])
    shape = {1: (2, 3, 9), 2: (2, 3, 6, 6), 3: (2, 3, 4, 4, 4)}[dim]
    return torch.randn(*shape, generator=g)


def _model(name):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP()
    if name == "emb_conv1d":
        return EmbConv1D()
    return ConvNet(int(name[-2]))


CASES = [
    # (model, target modules)
    ("mlp", ["lin0", "lin1"]),
    ("emb_conv1d", ["emb", "conv1d", "lin0"]),
    ("conv1d", ["conv", "lin0"]),
    ("conv2d", ["conv", "lin0"]),
    ("conv3d", ["conv", "lin0"]),
]
IDS = [c[0] for c in CASES]


def _randomise_factors(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------------------------------------- dense reference


def _dense_weight(layer):
    """W0 + W0 ⊙ M for one adapted layer, built with plain autograd from its factors (active adapters)."""
    base = layer.get_base_layer()
    W = base.weight
    total = W
    for a in layer.active_adapters:
        if isinstance(layer, hira.layer.Embedding):
            M = (layer.hira_embedding_B[a] @ layer.hira_embedding_A[a]).t()
        elif isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            A, B = layer.hira_A[a], layer.hira_B[a]
            if W.dim() == 4 and W.shape[2:] == (1, 1):
                M = (B.flatten(1) @ A.flatten(1))[..., None, None]
            else:
                M = layer.conv_fn(A.transpose(0, 1), B).transpose(0, 1)
        else:
            M = layer.hira_B[a] @ layer.hira_A[a]
            if layer.fan_in_fan_out:
                M = M.t()
        total = total + W * M
    return total


def _dense_forward(peft_model, name, x):
    """Run the model with every adapted layer replaced by its dense-formula functional equivalent."""
    inner = peft_model.base_model.model

    def lin(layer, h):
        base = layer.get_base_layer()
        W = _dense_weight(layer)
        if isinstance(layer, hira.layer.Embedding):
            return F.embedding(h, W)
        if isinstance(base, Conv1D):
            return torch.addmm(base.bias, h.reshape(-1, h.shape[-1]), W).reshape(*h.shape[:-1], -1)
        if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return layer.conv_fn(h, W, base.bias, stride=base.stride, padding=base.padding)
        return F.linear(h, W, base.bias)

    if name == "mlp":
        return lin(inner.lin1, torch.relu(lin(inner.lin0, x)))
    if name == "emb_conv1d":
        return lin(inner.lin0, torch.relu(lin(inner.conv1d, lin(inner.emb, x))))
    h = torch.relu(lin(inner.conv, x))
    return lin(inner.lin0, h.flatten(2).mean(-1))


# ----------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name,targets", CASES, ids=IDS)
def test_noop_at_init(name, targets):
    base = _model(name)
    x = _input(name)
    expected = base(x)
    model = get_peft_model(copy.deepcopy(base), hira.HiraConfig(r=4, target_modules=targets))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dense"])
@pytest.mark.parametrize("name,targets", CASES, ids=IDS)
def test_forward_and_gradients_match_dense_formula(name, targets, fused):
    model = get_peft_model(_model(name), hira.HiraConfig(r=4, target_modules=targets, fused=fused))
    _randomise_factors(model)
    x = _input(name)
    y = model(x)
    ref = _dense_forward(model, name, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # Nonzero B: the adapter must actually change the output.
    with model.disable_adapter():
        assert (model(x) - y).abs().max() > 1e-3
    g = torch.randn_like(y)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, params, g)
    ref_grads = torch.autograd.grad(ref, params, g)
    for p_grad, r_grad in zip(grads, ref_grads):
        torch.testing.assert_close(p_grad, r_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,targets", CASES, ids=IDS)
def test_only_adapter_weights_train(name, targets):
    model = get_peft_model(_model(name), hira.HiraConfig(r=4, target_modules=targets))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("hira_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = _input(name)
    for _ in range(3):  # B starts at 0: the first step only moves B, the second moves A too
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n


@pytest.mark.parametrize("name,targets", CASES, ids=IDS)
def test_merge_unmerge_and_unload(name, targets):
    base = _model(name)
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(copy.deepcopy(base), hira.HiraConfig(r=4, target_modules=targets))
    _randomise_factors(model, scale=0.1)
    x = _input(name)
    with torch.no_grad():
        y = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        # Unmerge restores W0 bit for bit (exact stored copy, not division by 1 + B·A).
        for n, p in model.base_model.model.named_parameters():
            key = n.replace(".base_layer", "")
            if key in originals:
                assert torch.equal(p, originals[key]), n
        merged = model.merge_and_unload()
        assert not any("hira_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_safe_merge_raises_on_non_finite():
    model = get_peft_model(MLP(), hira.HiraConfig(r=2, target_modules=["lin0"]))
    with torch.no_grad():
        model.base_model.model.lin0.hira_B["default"].fill_(float("inf"))
        model.base_model.model.lin0.hira_A["default"].fill_(1.0)
    w_before = model.base_model.model.lin0.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="Non-finite"):
        model.base_model.model.lin0.merge(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, w_before)


def test_several_adapters_set_adapter_and_disable():
    base = MLP()
    x = _input("mlp")
    model = get_peft_model(copy.deepcopy(base), hira.HiraConfig(r=2, target_modules=["lin0", "lin1"]))
    model.add_adapter("other", hira.HiraConfig(r=3, target_modules=["lin0", "lin1"]))
    _randomise_factors(model)
    inner = model.base_model.model

    def dense_with(adapters):
        for layer in (inner.lin0, inner.lin1):
            layer._active_adapter = adapters
        return _dense_forward(model, "mlp", x)

    with torch.no_grad():
        model.set_adapter("default")
        y_default = model(x)
        torch.testing.assert_close(y_default, dense_with(["default"]), rtol=1e-5, atol=1e-5)
        model.set_adapter("other")
        y_other = model(x)
        torch.testing.assert_close(y_other, dense_with(["other"]), rtol=1e-5, atol=1e-5)
        assert (y_default - y_other).abs().max() > 1e-3
        # Both adapters active at once: W0 ⊙ (1 + M1 + M2), folded into one fused GEMM.
        model.base_model.set_adapter(["default", "other"])
        y_both = model(x)
        torch.testing.assert_close(y_both, dense_with(["default", "other"]), rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base(x))
    # Gradients with both adapters active: every factor tensor (A and B of both adapters) equals autograd through
    # the dense formula.
    model.base_model.set_adapter(["default", "other"])
    for n, p in model.named_parameters():
        p.requires_grad_("hira_" in n)
    params = [p for n, p in model.named_parameters() if "hira_" in n]
    assert len(params) == 8  # A, B of two adapters on two layers
    y = model(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g)
    ref_grads = torch.autograd.grad(dense_with(["default", "other"]), params, g)
    for gr, rg in zip(grads, ref_grads):
        torch.testing.assert_close(gr, rg, rtol=1e-4, atol=1e-6)


def test_dropout_is_exact_in_fused_path():
    """Base branch sees x, adapter branch sees dropout(x): fused equals the dense formula under the same RNG."""
    torch.manual_seed(0)
    model = get_peft_model(MLP(), hira.HiraConfig(r=4, target_modules=["lin0", "lin1"], hira_dropout=0.5))
    _randomise_factors(model)
    model.train()
    x = _input("mlp")
    torch.manual_seed(123)
    y = model(x)
    inner = model.base_model.model
    torch.manual_seed(123)

    def lin(layer, h):
        W = layer.get_base_layer().weight
        hd = layer.hira_dropout["default"](h)
        M = layer.hira_B["default"] @ layer.hira_A["default"]
        return F.linear(h, W, layer.get_base_layer().bias) + F.linear(hd, W * M)

    ref = lin(inner.lin1, torch.relu(lin(inner.lin0, x)))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(y.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # In eval mode dropout is off and the output is deterministic.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_fused_saves_no_dense_matrix():
    """The fused Function keeps only x and the parameters for backward; stock-style dense keeps W0 ⊙ BA."""
    layer = nn.Linear(64, 96, bias=False)
    x = torch.randn(5, 64, requires_grad=True)

    def saved_numels(fused):
        model = get_peft_model(nn.Sequential(copy.deepcopy(layer)), hira.HiraConfig(r=4, target_modules=["0"], fused=fused))
        _randomise_factors(model)
        params = {p.data_ptr() for p in model.parameters()}
        sizes = []

        def pack(t):
            if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return sizes

    assert max(saved_numels(False), default=0) >= 64 * 96  # the dense product is kept
    assert sum(saved_numels(True)) == 0  # nothing new besides x and the parameters


def test_errors_are_clear():
    with pytest.raises(ValueError, match="positive integer"):
        hira.HiraConfig(r=0, target_modules=["lin0"])
    with pytest.raises(ValueError, match="positive integer"):
        hira.HiraConfig(r=-3, target_modules=["lin0"])
    with pytest.raises(ValueError, match=r"lin9.*not found"):
        get_peft_model(MLP(), hira.HiraConfig(r=2, target_modules=["lin0", "lin9"]))

    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(x)

    with pytest.raises(ValueError, match="cannot adapt module of type LayerNorm"):
        get_peft_model(WithNorm(), hira.HiraConfig(r=2, target_modules=["norm"]))

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="groups=2"):
        get_peft_model(Grouped(), hira.HiraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ValueError, match="half_precision_forward"):
        hira.HiraConfig(r=2, target_modules=["lin0"], half_precision_forward="fp8")


def test_trainable_parameter_count_matches_lora_llama3_8b():
    """r·(in+out) per adapted linear, exactly LoRA's count; Llama-3-8B q,k,v,up,down at r=32 → 56,623,104."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    shapes = {  # (in, out) of Llama-3-8B's targeted projections
        "q_proj": (cfg.hidden_size, cfg.hidden_size),
        "k_proj": (cfg.hidden_size, cfg.hidden_size // 4),
        "v_proj": (cfg.hidden_size, cfg.hidden_size // 4),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    # Count on meta-device layers of the real shapes (one decoder layer) and scale by the 32 layers.
    with torch.device("meta"):
        block = nn.ModuleDict({k: nn.Linear(i, o, bias=False) for k, (i, o) in shapes.items()})

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

    model = get_peft_model(Wrapper(), hira.HiraConfig(r=32, target_modules=list(shapes)), low_cpu_mem_usage=True)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable * 32 == 56_623_104
    assert trainable == sum(32 * (i + o) for i, o in shapes.values())
