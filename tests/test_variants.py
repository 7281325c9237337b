"""The HiRA family variants (HiLoRA, BHRA, HiRA-SB, modulators) against independent dense formulas.

Every case checks: forward = its dense formula (fused and unfused), gradients = plain autograd through that formula,
no-op at init, exact save/load/merge/unmerge, parameter counts, clear errors, and that stock PEFT refuses the
checkpoint. The dense references below are written from the math, not from hira/variants.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import hira
from hira.variants import hash_uniform
from hira_reference import ref_hash_uniform


D_IN, D_OUT, R = 16, 24, 4


class Stack(nn.Module):
    """Three numbered layers (the smooth modulator needs neighbours), each with an adapted ``proj``."""

    def __init__(self, n_layers=3, conv1d=False):
        super().__init__()
        mk = (lambda: Conv1D(D_OUT, D_IN)) if conv1d else (lambda: nn.Linear(D_IN, D_OUT))
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": mk()}) for _ in range(n_layers)])
        self.head = nn.Linear(D_OUT, 3)

    def forward(self, x):
        h = 0
        for lyr in self.layers:
            h = h + torch.tanh(lyr["proj"](x))
        return self.head(h)


def make_base(seed=0, conv1d=False):
    torch.manual_seed(seed)
    m = Stack(conv1d=conv1d)
    for p in m.parameters():  # Conv1D starts at normal(0.02); make weights O(1) and without zeros
        p.data.normal_(0, 0.5)
    return m


CASES = {
    "hilora": dict(variant="hilora", hilora_r2=1),
    "hilora_alpha": dict(variant="hilora", hilora_r2=2, hilora_alpha=4.0),
    "bhra": dict(variant="bhra", bhra_blocks=2),
    "bhra4": dict(variant="bhra", bhra_blocks=4),
    "sb": dict(variant="sb"),
    "random": dict(modulator="random", modulator_seed=7),
    "lowrank": dict(modulator="lowrank", modulator_rank=3),
    "smooth": dict(modulator="smooth"),
    "bhra_random": dict(variant="bhra", bhra_blocks=2, modulator="random"),
    "hilora_lowrank": dict(variant="hilora", hilora_r2=2, modulator="lowrank", modulator_rank=2),
}


def cfg(case, **kw):
    return hira.HiraConfig(r=R, target_modules=["proj"], **{**CASES[case], **kw})


def adapted(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, hira.layer.HiraFamilyMixin)]


def randomize(model, seed=1):
    """Nonzero values for every adapter tensor that trains (and SB's frozen factors), keeping requires_grad."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if ".hira_" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------------------------- dense references


def ref_modulator(case, layer, name, model_base_weights):
    """R (out×in) from the math: W0, hashed uniform, W0's truncated SVD, or the neighbour mean."""
    c = CASES[case]
    W0 = layer._weight_oi(layer.get_base_layer().weight).detach()
    mod = c.get("modulator", "weight")
    if mod == "weight":
        return W0
    if mod == "random":
        return ref_hash_uniform(tuple(W0.shape), c.get("modulator_seed", 0)).float()
    if mod == "lowrank":
        U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
        v = c["modulator_rank"]
        return (U[:, :v] * S[:v] @ Vh[:v]).float()
    if mod == "smooth":
        idx = int(name.split(".")[-2])
        ws = [model_base_weights[j] for j in (idx - 1, idx, idx + 1) if j in model_base_weights]
        return sum(ws) / len(ws)
    raise AssertionError(mod)


def ref_delta(case, layer, adapter, R_mod, params=None):
    """ΔW from the math, built from ``params`` (defaults to the layer's tensors) so autograd can go through it."""
    c = CASES[case]
    p = params or {
        "A": layer.hira_A[adapter],
        "B": layer.hira_B[adapter],
        "S": layer.hira_R[adapter] if adapter in layer.hira_R else None,
        "A2": layer.hira_lora_A[adapter] if adapter in layer.hira_lora_A else None,
        "B2": layer.hira_lora_B[adapter] if adapter in layer.hira_lora_B else None,
    }
    v = c.get("variant", "hira")
    if v in ("hira", "hilora"):
        M = p["B"] @ p["A"]
    elif v == "sb":
        M = p["B"] @ p["S"] @ p["A"]
    elif v == "bhra":
        k = c["bhra_blocks"]
        db, nb = D_OUT // k, D_IN // k
        rows = []
        for i in range(k):
            rows.append(torch.cat([p["B"][i, j] @ p["A"][i, j] for j in range(k)], dim=1))
        M = torch.cat(rows, dim=0)
        assert M.shape == (D_OUT, D_IN) and p["B"].shape[2:] == (db, R // k) and p["A"].shape[3] == nb
    delta = R_mod * M
    if v == "hilora":
        r2 = c["hilora_r2"]
        s = c["hilora_alpha"] / r2 if c.get("hilora_alpha") else 1.0
        delta = delta + s * p["B2"] @ p["A2"]
    return delta


def ref_forward(case, model, x, params_by_layer=None):
    """The whole Stack forward with W' = W0 + ΔW_ref, by plain autograd."""
    base_w = {int(n.split(".")[-2]): lyr._weight_oi(lyr.get_base_layer().weight).detach() for n, lyr in adapted(model)}
    h = 0
    for n, lyr in adapted(model):
        W0 = lyr._weight_oi(lyr.get_base_layer().weight).detach()
        Rm = ref_modulator(case, lyr, n, base_w)
        pr = params_by_layer[n] if params_by_layer else None
        W = W0 + ref_delta(case, lyr, "default", Rm, pr)
        h = h + torch.tanh(F.linear(x, W, lyr.get_base_layer().bias))
    head = model.base_model.model.head
    return head(h)


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_dense_formula(case, fused, conv1d):
    model = get_peft_model(make_base(conv1d=conv1d), cfg(case, fused=fused))
    randomize(model)
    x = torch.randn(7, D_IN)
    torch.testing.assert_close(model(x), ref_forward(case, model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_autograd(case):
    model = get_peft_model(make_base(), cfg(case))
    randomize(model)
    x = torch.randn(9, D_IN)
    tgt = torch.randn(9, 3)
    F.mse_loss(model(x), tgt).backward()
    # reference: the same tensors as fresh leaves, dense formula, plain autograd
    leaves, names = {}, {}
    for n, lyr in adapted(model):
        d = {}
        for key, cont in (("A", "hira_A"), ("B", "hira_B"), ("S", "hira_R"), ("A2", "hira_lora_A"), ("B2", "hira_lora_B")):
            c = getattr(lyr, cont)
            if "default" in c:
                t = c["default"].detach().clone().requires_grad_(True)
                d[key] = t
                names[(n, key)] = c["default"]
        leaves[n] = d
    F.mse_loss(ref_forward(case, model, x, leaves), tgt).backward()
    trained = 0
    for (n, key), p in names.items():
        ref = leaves[n][key].grad
        if p.requires_grad:
            trained += 1
            torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4)
        else:
            assert p.grad is None
    assert trained > 0
    if CASES[case].get("variant") == "sb":  # only S trains
        assert all(("S" == k) == p.requires_grad for (n, k), p in names.items())


@pytest.mark.parametrize("case", list(CASES))
def test_noop_at_init(case):
    base = make_base()
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        y0 = base(x)
    model = get_peft_model(copy.deepcopy(base), cfg(case))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, atol=0, rtol=0)


def _lora_params(d, n, r):
    return r * (d + n)


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_parameter_count(case):
    model = get_peft_model(make_base(), cfg(case))
    trainable, _ = model.get_nb_trainable_parameters()
    n_layers = 3
    if CASES[case].get("variant") == "sb":
        assert trainable == n_layers * R * R
    else:  # HiLoRA (r1 + r2 = r), BHRA (k²·(r/k)·(d/k+n/k)), modulators: exactly rank-r LoRA's count
        assert trainable == n_layers * _lora_params(D_OUT, D_IN, R)
    lora = get_peft_model(make_base(), LoraConfig(r=R, target_modules=["proj"]))
    if CASES[case].get("variant") != "sb":
        assert trainable == lora.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_merge_roundtrip(case, tmp_path):
    model = get_peft_model(make_base(), cfg(case))
    randomize(model)
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HIRA_FAMILY"
    loaded = PeftModel.from_pretrained(make_base(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, atol=0, rtol=0)
        # merge / unmerge
        W0s = {n: lyr.get_base_layer().weight.detach().clone() for n, lyr in adapted(loaded)}
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(x), y, atol=2e-5, rtol=1e-5)
        loaded.unmerge_adapter()
        for n, lyr in adapted(loaded):
            assert torch.equal(lyr.get_base_layer().weight, W0s[n])
        torch.testing.assert_close(loaded(x), y, atol=0, rtol=0)
        merged = loaded.merge_and_unload()
        assert not any(isinstance(m, hira.layer.HiraFamilyMixin) for m in merged.modules())
        torch.testing.assert_close(merged(x), y, atol=2e-5, rtol=1e-5)


def test_stock_peft_refuses_variant_checkpoints(tmp_path):
    for i, case in enumerate(["hilora", "bhra", "sb", "random"]):
        d = tmp_path / case
        get_peft_model(make_base(), cfg(case)).save_pretrained(d)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from torch import nn
        from peft import PeftModel
        assert "hira" not in sys.modules
        base = nn.ModuleDict({{"layers": nn.ModuleList([nn.ModuleDict({{"proj": nn.Linear({D_IN}, {D_OUT})}}) for _ in range(3)])}})
        refused = 0
        for case in ["hilora", "bhra", "sb", "random"]:
            try:
                PeftModel.from_pretrained(base, r"{tmp_path}/" + case)
            except (KeyError, ValueError) as e:
                refused += 1
                print(case, "refused:", type(e).__name__, e)
        print("REFUSED", refused)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "REFUSED 4" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------- limits of HiLoRA, BHRA


def _copy_factor(dst, src):
    dst.data.copy_(src.data.reshape(dst.shape))


def test_hilora_r2_zero_is_hira():
    x = torch.randn(5, D_IN)
    a = get_peft_model(make_base(), hira.HiraConfig(r=R, target_modules=["proj"]))
    randomize(a)
    b = get_peft_model(make_base(), hira.HiraConfig(r=R, target_modules=["proj"], variant="hilora", hilora_r2=0))
    for (_, la), (_, lb) in zip(adapted(a), adapted(b)):
        _copy_factor(lb.hira_A["default"], la.hira_A["default"])
        _copy_factor(lb.hira_B["default"], la.hira_B["default"])
        assert lb.hira_lora_A["default"].numel() == 0
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_hilora_r1_zero_is_lora(alpha):
    x = torch.randn(5, D_IN)
    lora = get_peft_model(
        make_base(), LoraConfig(r=R, lora_alpha=alpha if alpha else R, target_modules=["proj"], init_lora_weights=False)
    )
    hl = get_peft_model(
        make_base(), hira.HiraConfig(r=R, target_modules=["proj"], variant="hilora", hilora_r2=R, hilora_alpha=alpha)
    )
    lora_layers = [m for m in lora.modules() if hasattr(m, "lora_A")]
    for ll, (_, hlay) in zip(lora_layers, adapted(hl)):
        assert hlay.hira_A["default"].numel() == 0
        _copy_factor(hlay.hira_lora_A["default"], ll.lora_A["default"].weight)
        _copy_factor(hlay.hira_lora_B["default"], ll.lora_B["default"].weight)
    torch.testing.assert_close(hl(x), lora(x), atol=1e-6, rtol=1e-6)


def test_bhra_one_block_is_hira():
    x = torch.randn(5, D_IN)
    a = get_peft_model(make_base(), hira.HiraConfig(r=R, target_modules=["proj"]))
    randomize(a)
    b = get_peft_model(make_base(), hira.HiraConfig(r=R, target_modules=["proj"], variant="bhra", bhra_blocks=1))
    for (_, la), (_, lb) in zip(adapted(a), adapted(b)):
        _copy_factor(lb.hira_A["default"], la.hira_A["default"])
        _copy_factor(lb.hira_B["default"], la.hira_B["default"])
    torch.testing.assert_close(b(x), a(x), atol=1e-6, rtol=1e-6)


def test_bhra_blocks_are_independent():
    """Changing block (0, 1)'s factors changes only that block of ΔW."""
    model = get_peft_model(make_base(), cfg("bhra"))
    randomize(model)
    lyr = adapted(model)[0][1]
    W0 = lyr.get_base_layer().weight.detach()
    d0 = lyr.get_additive_delta("default")
    with torch.no_grad():
        lyr.hira_B["default"][0, 1] += 1.0
    d1 = lyr.get_additive_delta("default")
    changed = (d1 - d0).abs() > 0
    assert changed[: D_OUT // 2, D_IN // 2 :].all() or changed[: D_OUT // 2, D_IN // 2 :].float().mean() > 0.9
    changed[: D_OUT // 2, D_IN // 2 :] = False
    assert not changed.any()
    assert torch.isfinite(W0).all()


def test_random_modulator_is_deterministic_uniform():
    # the tensor implementation equals the element-by-element spec (Python integers), bit for bit
    assert torch.equal(hash_uniform((7, 11), 3).double(), ref_hash_uniform((7, 11), 3))
    assert torch.equal(hash_uniform((2, 3), 2**31 + 5).double(), ref_hash_uniform((2, 3), 2**31 + 5))
    a = hash_uniform((300, 200), 7)
    assert torch.equal(a, hash_uniform((300, 200), 7))
    assert not torch.equal(a, hash_uniform((300, 200), 8))
    assert a.min() >= 0 and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.01 and abs(a.var().item() - 1 / 12) < 0.005
    # no visible structure between neighbours
    assert abs(torch.corrcoef(torch.stack([a.flatten()[:-1], a.flatten()[1:]]))[0, 1].item()) < 0.02


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="nope"), "Unknown HiRA variant"),
        (dict(modulator="nope"), "Unknown modulator"),
        (dict(variant="hilora", hilora_r2=5), "0 <= hilora_r2 <= r"),
        (dict(variant="hilora", hilora_r2=-1), "0 <= hilora_r2 <= r"),
        (dict(variant="hilora", hilora_r2=1, hilora_alpha=0.0), "hilora_alpha must be positive"),
        (dict(hilora_r2=2), "only applies to variant='hilora'"),
        (dict(bhra_blocks=2), "only applies to variant='bhra'"),
        (dict(variant="bhra", bhra_blocks=3), "r must be divisible by bhra_blocks=3"),
        (dict(variant="bhra", bhra_blocks=0), "positive integer"),
        (dict(variant="sb", sb_target="nope"), "sb_target must be one of"),
        (dict(variant="sb", sb_init_step=-1.0), "sb_init_step must be >= 0"),
        (dict(modulator_seed=3), "only applies to modulator='random'"),
        (dict(modulator="lowrank", modulator_rank=0), "modulator_rank must be a positive integer"),
    ],
)
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hira.HiraConfig(r=R, target_modules=["proj"], **kwargs)


def test_bhra_grid_must_divide_weight_shape():
    # r=5 with a 5×5 grid: the rank divides, but 24×16 does not split into 5×5 blocks
    with pytest.raises(ValueError, match=r"BHRA grid 5×5 does not divide this layer: weight 24×16"):
        get_peft_model(make_base(), hira.HiraConfig(r=5, target_modules=["proj"], variant="bhra", bhra_blocks=5))


def test_variants_reject_unsupported_layers():
    class EC(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.conv = nn.Conv1d(3, 4, 3)

    for target in ("emb", "conv"):
        with pytest.raises(ValueError, match="supports linear layers"):
            get_peft_model(EC(), hira.HiraConfig(r=2, target_modules=[target], variant="hilora", hilora_r2=1))


def test_lowrank_rank_too_large_and_smooth_needs_index():
    with pytest.raises(ValueError, match="modulator_rank=20 exceeds"):
        get_peft_model(make_base(), hira.HiraConfig(r=R, target_modules=["proj"], modulator="lowrank", modulator_rank=20))

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no layer index"):
        get_peft_model(Flat(), hira.HiraConfig(r=2, target_modules=["proj"], modulator="smooth"))


def test_plain_config_stays_stock():
    c = hira.HiraConfig(r=R, target_modules=["proj"])
    assert c.is_plain_hira and c.peft_type.value == "HIRA"
    assert "variant" not in c.to_dict() and "hilora_r2" not in c.to_dict()
    for case in CASES:
        assert cfg(case).peft_type == hira.HiraFamilyType.HIRA_FAMILY


# ---------------------------------------------------------------------------------------------- HiRA-SB initialisation

SB_D = 64


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(SB_D, SB_D)}) for _ in range(2)])
        self.head = nn.Linear(SB_D, 8)

    def forward(self, x):
        h = x
        for lyr in self.layers:
            h = torch.tanh(lyr["proj"](h))
        return self.head(h)


@pytest.fixture(scope="module")
def sb_task():
    """Student = base; teacher weights W0 ⊙ (1 + E) with a full-rank E: a target HiRA-type update."""
    torch.manual_seed(0)
    base = Deep()
    for lyr in base.layers:
        lyr["proj"].weight.data.normal_(0, 1 / SB_D**0.5)
    teacher = copy.deepcopy(base)
    for lyr in teacher.layers:
        W = lyr["proj"].weight.data
        W.mul_(1 + 0.5 * torch.randn_like(W))
    X = torch.randn(2048, SB_D)
    with torch.no_grad():
        Y = teacher(X)
    batches = [(X[i : i + 256], Y[i : i + 256]) for i in range(0, 2048, 256)]
    return base, X, Y, batches


def _sb_loss(m, b):
    return F.mse_loss(m(b[0]), b[1])


def _train(base, X, Y, batches, cfg_kw, lr, steps, init=None):
    torch.manual_seed(1)
    m = get_peft_model(copy.deepcopy(base), hira.HiraConfig(r=R, target_modules=["proj"], **cfg_kw))
    if init is not None:
        hira.sb_init(m, batches, loss_fn=_sb_loss, progress=False, **init)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    losses = []
    for s in range(steps + 1):
        with torch.no_grad():
            losses.append(F.mse_loss(m(X), Y).item())
        if s == steps:
            break
        opt.zero_grad()
        _sb_loss(m, batches[s % len(batches)]).backward()
        opt.step()
    return m, losses


def test_sb_default_target_has_lowest_one_step_loss(sb_task):
    """The default ``sb_target`` is the one whose init lowers the loss most after one Adam step (offset start)."""
    base, X, Y, batches = sb_task
    one_step = {}
    for target in ("grad_times_weight", "grad_over_weight", "grad"):
        _, losses = _train(base, X, Y, batches, {"variant": "sb"}, 3e-3, 1, init={"target": target})
        one_step[target] = losses[1]
        assert losses[0] == pytest.approx(_train(base, X, Y, batches, {}, 3e-3, 0)[1][0])  # no-op start
    print("one-step loss by SB target:", one_step)
    default = hira.HiraConfig(r=R, target_modules=["proj"], variant="sb").sb_target
    assert min(one_step, key=one_step.get) == default


def test_sb_trains_faster_than_hira_with_r2_params(sb_task):
    base, X, Y, batches = sb_task
    lr, steps = 3e-3, 6
    m_h, l_h = _train(base, X, Y, batches, {}, lr, steps)
    m_sb, l_sb = _train(base, X, Y, batches, {"variant": "sb"}, lr, steps, init={})
    print("HiRA:", [round(v, 5) for v in l_h], "\nHiRA-SB:", [round(v, 5) for v in l_sb])
    assert l_sb[0] == pytest.approx(l_h[0])
    for s in range(1, steps + 1):
        assert l_sb[s] < l_h[s]
    assert (l_h[0] - l_sb[-1]) > 5 * (l_h[0] - l_h[-1])
    n_sb, n_h = m_sb.get_nb_trainable_parameters()[0], m_h.get_nb_trainable_parameters()[0]
    assert n_sb == 2 * R * R and n_h == 2 * R * (SB_D + SB_D)


def test_sb_init_applied_and_exact_roundtrip(sb_task, tmp_path):
    base, X, Y, batches = sb_task
    m = get_peft_model(copy.deepcopy(base), hira.HiraConfig(r=R, target_modules=["proj"], variant="sb"))
    rep = hira.sb_init(m, batches, loss_fn=_sb_loss, progress=False, init_step=10.0, target="grad_over_weight")
    assert set(rep) == {n for n, _ in adapted(m)} and all(0 < v["energy"] <= 1 for v in rep.values())
    with torch.no_grad():
        y = m(X[:64])
        l0 = F.mse_loss(base(X), Y).item()
        assert F.mse_loss(m(X), Y).item() < l0  # the applied projected full-FT step lowers the loss at once
    for _, lyr in adapted(m):  # B, A orthogonal (scaled), frozen
        B, A = lyr.hira_B["default"], lyr.hira_A["default"]
        assert not B.requires_grad and not A.requires_grad and lyr.hira_R["default"].requires_grad
        c2 = (B.t() @ B).diag().mean()
        torch.testing.assert_close(B.t() @ B, c2 * torch.eye(R), atol=1e-3 * c2, rtol=0)
    m.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X[:64]), y, atol=0, rtol=0)
        torch.testing.assert_close(loaded.merge_and_unload()(X[:64]), y, atol=1e-5, rtol=1e-5)


def test_sb_guard_against_zero_weights(sb_task):
    base, X, Y, batches = sb_task
    b = copy.deepcopy(base)
    with torch.no_grad():
        b.layers[0]["proj"].weight[:, :5] = 0.0  # exact zeros in W0
    m = get_peft_model(b, hira.HiraConfig(r=R, target_modules=["proj"], variant="sb"))
    hira.sb_init(m, batches, loss_fn=_sb_loss, progress=False, target="grad_over_weight", init_step=1.0)
    for _, lyr in adapted(m):
        for c in (lyr.hira_A, lyr.hira_B, lyr.hira_R):
            assert torch.isfinite(c["default"]).all()
    with torch.no_grad():
        assert torch.isfinite(m(X)).all()
