"""Differential test matrix of the HiRA tuner: every documented path against a dense float64 reference.

Each cell builds a one-layer model, adapts it, gives the factors random values (ΔW ≈ 0.3·W0, so a dropped or
mis-scaled adapter fails every tolerance by orders of magnitude) and walks the states a user meets: fresh (exact
no-op), forward, gradients, a training step, merge, merge again, unmerge, safe_merge, save/load, merge_and_unload.
Every output and gradient is compared with a float64 reference of the *math*, ``op(x, W0 + ΔW) + b``, written here
from the formulas (no tuner code is called to build it).

The tables below are the documentation of what is supported (docs/tuner.md links here):

* ``LAYERS``: layer types, including every embedding option and conv kernel shapes with 1-sized dimensions;
* ``VARIANTS``: every variant and modulator of the family (on the linear layer types);
* ``DTYPES``: weight dtype × adapter dtype × autocast;
* ``PAIRS``: two adapters on one layer (same/different variants, dtypes, runtime options, plain next to family);
* ``TOL``: the tolerances, by the dtype the checked quantity is computed in.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import hira
from tiny_layers import DTYPES, LAYERS, Net, ScaledEmbedding, autocast, build, make_input  # noqa: F401
from hira_reference import bnb_dequantized, bnb_quantised_like, ref_hash_uniform, rel, truncated_svd


bnb = pytest.importorskip("bitsandbytes")

# ================================================================================================ tables

LINEAR_LAYERS = ("linear", "conv1d_tf", "bnb_8bit", "bnb_4bit")

# name: HiraConfig fields (all variants and modulators; linear layer types only)
VARIANTS = {
    "hira": {},
    "hilora": {"variant": "hilora", "hilora_r2": 1},
    "hilora_alpha": {"variant": "hilora", "hilora_r2": 2, "hilora_alpha": 6.0},
    "bhra": {"variant": "bhra", "bhra_blocks": 2},
    "sb": {"variant": "sb"},
    "random": {"modulator": "random", "modulator_seed": 3},
    "lowrank": {"modulator": "lowrank", "modulator_rank": 2},
    "bhra_random": {"variant": "bhra", "bhra_blocks": 2, "modulator": "random"},
    "sb_lowrank": {"variant": "sb", "modulator": "lowrank", "modulator_rank": 3},
    "hilora_random": {"variant": "hilora", "hilora_r2": 1, "modulator": "random", "modulator_seed": 1},
}

BNB_DTYPES = ("fp32", "bf16_adapters_fp32", "bf16_adapters_fp32_autocast")

# Relative L2 error allowed for a quantity computed in this dtype (output rounding included). The adapter's own
# effect on every checked quantity is >= 0.1 (asserted), so each tolerance is far below it.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def r_for(layer_name):
    return 4


def config(layer_name, variant="hira", **extra):
    return hira.HiraConfig(r=r_for(layer_name), target_modules=["layer"], **VARIANTS[variant], **extra)


def adapt(layer_name, variant, dt_name, **extra):
    net = build(layer_name, dt_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            net, config(layer_name, variant, **extra), autocast_adapter_dtype=DTYPES[dt_name][1]
        )
    return model


def layer_of(model):
    return model.base_model.model.layer


# ================================================================================================ fp64 reference


dequantized = bnb_dequantized


def base_weight_oi(layer, layer_name):
    """W0 (out, in) / kernel layout, fp64, of the adapted layer's base (original, unmerged)."""
    base = layer.get_base_layer()
    if layer_name.startswith("bnb"):
        return dequantized(base)
    W = base.weight.detach().double().clone()  # a copy: fp64 weights would alias the live tensor
    return W.t() if layer_name == "conv1d_tf" else W


def factors(layer, adapter):
    """Every factor tensor of an adapter, by role (the module's own tensors, so gradients can be compared)."""
    if isinstance(layer, hira.layer.Embedding):
        return {"A": layer.hira_embedding_A[adapter], "B": layer.hira_embedding_B[adapter]}
    f = {"A": layer.hira_A[adapter], "B": layer.hira_B[adapter]}
    if adapter in layer.hira_R:
        f["S"] = layer.hira_R[adapter]
    if adapter in layer.hira_lora_A:
        f["A2"], f["B2"] = layer.hira_lora_A[adapter], layer.hira_lora_B[adapter]
    return f


def stored_modulator(layer, adapter):
    """{"R": U·V (fp64)} for a low-rank modulator, else {}."""
    if adapter in getattr(layer, "hira_mod_U", {}):
        return {"R": layer.hira_mod_U[adapter].double() @ layer.hira_mod_V[adapter].double()}
    return {}


def ref_modulator(cfg, W0, stored=None):
    """R of ``W0 + R ⊙ M``. For ``lowrank`` the stored factors' product (its agreement with the fp64 truncated SVD is
    checked on its own, with the SVD's conditioning-dependent tolerance)."""
    mod = cfg.modulator
    if mod == "weight":
        return W0
    if mod == "random":
        return ref_hash_uniform(tuple(W0.shape), cfg.modulator_seed)
    if mod == "lowrank":
        return stored if stored is not None else truncated_svd(W0, cfg.modulator_rank)
    raise AssertionError(mod)


def ref_delta(cfg, W0, f, kind):
    """ΔW (fp64) of one adapter from its factors ``f`` (fp64 tensors) and the original weight W0 (fp64); ``f["R"]``
    is the stored low-rank modulator when there is one."""
    if kind == "embedding":
        return W0 * (f["B"] @ f["A"]).t()
    if kind == "conv":
        o, r = f["B"].shape[:2]
        M = torch.einsum("or,r...->o...", f["B"].reshape(o, r), f["A"])
        return W0 * M
    R = ref_modulator(cfg, W0, f.get("R"))
    v = cfg.variant
    if v == "sb":
        M = f["B"] @ f["S"] @ f["A"]
    elif v == "bhra":
        k = cfg.bhra_blocks
        M = torch.cat([torch.cat([f["B"][i, j] @ f["A"][i, j] for j in range(k)], 1) for i in range(k)], 0)
    else:
        M = f["B"] @ f["A"]
    delta = R * M
    if v == "hilora":
        s = cfg.hilora_alpha / cfg.hilora_r2 if cfg.hilora_alpha is not None else 1.0
        delta = delta + s * f["B2"] @ f["A2"]
    return delta


def kind_of(layer_name):
    if layer_name.startswith("embedding"):
        return "embedding"
    if layer_name.startswith("conv") and layer_name != "conv1d_tf":
        return "conv"
    return "linear"


def ref_apply(layer_name, base, W, x):
    """``op(x, W) + b`` in fp64 for weight W in (out, in) / kernel layout."""
    kind = kind_of(layer_name)
    if kind == "embedding":
        out = F.embedding(x, W)
        scale = getattr(base, "embed_scale", None)
        return out * float(scale) if scale is not None else out
    b = None if getattr(base, "bias", None) is None else base.bias.detach().double()
    if kind == "conv":
        fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[W.dim()]
        return fn(x.double(), W, b, stride=base.stride, padding=base.padding, dilation=base.dilation)
    return F.linear(x.double(), W, b)


def reference(model, layer_name, x, adapters=("default",), requires_grad=False):
    """(fp64 output, {adapter: {role: fp64 leaf}}) of the active adapters' math."""
    layer = layer_of(model)
    base = layer.get_base_layer()
    W0 = base_weight_oi(layer, layer_name)
    leaves, total = {}, torch.zeros_like(W0)
    for a in adapters:
        cfg = model.peft_config[a]
        leaves[a] = {k: v.detach().double().requires_grad_(requires_grad and v.requires_grad)
                     for k, v in factors(layer, a).items()}
        total = total + ref_delta(cfg, W0, {**leaves[a], **stored_modulator(layer, a)}, kind_of(layer_name))
    if layer_name.startswith("bnb"):  # base output from the quantised kernel (frozen), adapter part in fp64
        with torch.no_grad(), model.disable_adapter():
            y0 = model(x).double()
        return y0 + F.linear(x.double(), total), leaves
    return ref_apply(layer_name, base, W0 + total, x), leaves


def compute_dtypes_of(dt_name, adapters_dtype):
    """(gemm dtype, work dtype) the tuner documents for this setting (docs/tuner.md)."""
    wdt, _, ac = DTYPES[dt_name]
    if ac is not None:
        return ac, ac
    return wdt, torch.promote_types(wdt, adapters_dtype)


def randomize(model, layer_name, adapters=("default",), seed=5, rel_size=0.3):
    """Random factor values with ΔW ≈ rel_size · W0 (rms), deterministically."""
    layer = layer_of(model)
    g = torch.Generator().manual_seed(seed)
    W0 = base_weight_oi(layer, layer_name)
    with torch.no_grad():
        for a in adapters:
            fs = factors(layer, a)
            for k, p in fs.items():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
            cfg = model.peft_config[a]
            d = ref_delta(cfg, W0, {**{k: v.double() for k, v in fs.items()}, **stored_modulator(layer, a)},
                          kind_of(layer_name))
            ratio = float(d.pow(2).mean().sqrt() / W0.pow(2).mean().sqrt())
            trainable = [p for p in fs.values() if p.requires_grad]
            # ΔW is bilinear in (A, B) (and linear in S): scale the trainable factors to reach rel_size
            n = len(trainable) if cfg.variant != "sb" else 1
            for p in trainable if cfg.variant != "sb" else [fs["S"]]:
                p.mul_((rel_size / ratio) ** (1.0 / n))


def expected_trainable(layer_name, variant, r=4):
    """Trainable parameters the docs promise per adapted layer (docs/tuner.md, docs/variants.md)."""
    base = LAYERS[layer_name][0]()
    if kind_of(layer_name) == "embedding":
        return r * (base.num_embeddings + base.embedding_dim)
    if kind_of(layer_name) == "conv":
        return r * (base.in_channels * math.prod(base.kernel_size) + base.out_channels)
    out_f, in_f = (base.weight.shape[1], base.weight.shape[0]) if layer_name == "conv1d_tf" else (32, 64) if \
        layer_name.startswith("bnb") else (base.out_features, base.in_features)
    return r * r if VARIANTS[variant].get("variant") == "sb" else r * (in_f + out_f)


# ================================================================================================ the cell


def cells():
    out = []
    for layer_name in LAYERS:
        variants = VARIANTS if layer_name in LINEAR_LAYERS else {"hira": {}}
        dts = BNB_DTYPES if layer_name.startswith("bnb") else DTYPES
        for v in variants:
            for d in dts:
                if layer_name.startswith("bnb") and v not in ("hira", "hilora", "random", "sb") and d != "fp32":
                    continue
                out.append(pytest.param(layer_name, v, d, id=f"{layer_name}-{v}-{d}"))
    return out


def _assert_close(got, ref, dtype, what, scale_ref=None):
    err = rel(got, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g} ({dtype})"


@pytest.mark.parametrize("layer_name,variant,dt_name", cells())
def test_cell(layer_name, variant, dt_name, tmp_path):
    wdt, upcast, ac = DTYPES[dt_name]
    model = adapt(layer_name, variant, dt_name)
    layer = layer_of(model)
    fs = factors(layer, "default")
    adapter_dtype = next(iter(fs.values())).dtype
    assert adapter_dtype == (torch.float32 if upcast and wdt in (torch.bfloat16, torch.float16) else wdt)
    gdt, work = compute_dtypes_of(dt_name, adapter_dtype)
    x = make_input(layer_name, dt_name)

    if "R" in stored_modulator(layer, "default"):  # the low-rank modulator is W0's truncated SVD
        W0 = base_weight_oi(layer, layer_name)
        R_ref = truncated_svd(W0, model.peft_config["default"].modulator_rank)
        assert rel(stored_modulator(layer, "default")["R"], R_ref) < (1e-10 if wdt == torch.float64 else 1e-4)

    # trainable parameters: exactly what the docs promise, and only adapter tensors
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("hira_" in n for n in trainable), trainable
    assert sum(trainable.values()) == expected_trainable(layer_name, variant), trainable

    # fresh: an exact no-op
    with torch.no_grad(), autocast(dt_name):
        y_fresh = model(x)
        with model.disable_adapter():
            y_base = model(x)
    assert torch.equal(y_fresh, y_base), "a fresh adapter must not change the output"

    randomize(model, layer_name)
    # the input gradient (what earlier layers train on) is checked too, except through a quantised base kernel
    check_x = x.dtype.is_floating_point and not layer_name.startswith("bnb")
    x_model = x.clone().requires_grad_(check_x)
    x_ref = x.clone().double().requires_grad_(check_x) if check_x else x
    ref, leaves = reference(model, layer_name, x_ref, requires_grad=True)
    with model.disable_adapter(), torch.no_grad(), autocast(dt_name):
        y_base = model(x)
    assert rel(y_base, ref) > 0.05, "the adapter's effect must dwarf every tolerance"

    # forward and gradients
    with autocast(dt_name):
        y = model(x_model)
    assert y.dtype == (ac if ac is not None and kind_of(layer_name) != "embedding" else y_base.dtype)
    out_tol_dtype = gdt if kind_of(layer_name) != "embedding" else wdt
    _assert_close(y, ref, out_tol_dtype, "forward")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    names = [k for k, p in fs.items() if p.requires_grad]
    grads = torch.autograd.grad(y, [fs[k] for k in names] + ([x_model] if check_x else []), g)
    ref_grads = torch.autograd.grad(ref, [leaves["default"][k] for k in names] + ([x_ref] if check_x else []),
                                    g.double())
    if check_x:
        assert grads[-1].dtype == x.dtype
        _assert_close(grads[-1], ref_grads[-1], out_tol_dtype, "grad of the input")
        grads, ref_grads = grads[:-1], ref_grads[:-1]
    grad_dtype = work if kind_of(layer_name) != "embedding" else torch.promote_types(wdt, adapter_dtype)
    for k, gr, rg in zip(names, grads, ref_grads):
        assert gr.dtype == fs[k].dtype
        _assert_close(gr, rg, grad_dtype, f"grad {k}")
    frozen = [k for k, p in fs.items() if not p.requires_grad]
    assert frozen == (["A", "B"] if VARIANTS[variant].get("variant") == "sb" else [])

    # a training step moves exactly the trainable factors; the output keeps following the reference
    before = {k: p.detach().clone() for k, p in fs.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with autocast(dt_name):
        loss = (model(x).float() * g.float()).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    for k, p in fs.items():
        assert torch.equal(before[k], p.detach()) == (k in frozen), f"{k} moved={k not in frozen} expected"
    ref, _ = reference(model, layer_name, x)
    with torch.no_grad(), autocast(dt_name):
        y = model(x)
    _assert_close(y, ref, out_tol_dtype, "forward after a step")

    _merge_states(model, layer_name, dt_name, x, y, ref, out_tol_dtype)
    _save_load(model, layer_name, variant, dt_name, x, y, tmp_path)
    # merge_and_unload: a plain module computing the merged math
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if layer_name.startswith("bnb"):  # re-quantised (checked above): the unloaded layer is the merged one
            plain.merge_adapter()
            with torch.no_grad(), autocast(dt_name):
                ref = plain(x)
        unloaded = plain.merge_and_unload()
    assert not any("hira_" in n for n, _ in unloaded.named_parameters())
    assert type(unloaded.layer).__module__ not in ("hira.layer", "hira.bnb")
    with torch.no_grad(), autocast(dt_name):
        y_unloaded = unloaded(x)
    if layer_name.startswith("bnb"):
        assert torch.equal(y_unloaded, ref)
    else:
        _assert_close(y_unloaded, ref, _merged_tol_dtype(layer_name, wdt, gdt), "merge_and_unload")


def _merged_tol_dtype(layer_name, wdt, gdt):
    """A merged weight is rounded to the weight dtype (bitsandbytes: re-quantised, checked separately)."""
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return max(wdt, gdt, key=order.index)


def _merge_states(model, layer_name, dt_name, x, y, ref, out_tol_dtype):
    wdt = DTYPES[dt_name][0]
    layer = layer_of(model)
    base = layer.get_base_layer()
    W_before = base.weight.detach().clone()
    W0 = base_weight_oi(layer, layer_name)
    fs = {k: v.detach().double() for k, v in factors(layer, "default").items()}
    total = ref_delta(model.peft_config["default"], W0, {**fs, **stored_modulator(layer, "default")}, kind_of(layer_name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    assert layer.merged
    if layer_name.startswith("bnb"):
        _check_requantised(layer, layer_name, W0 + total)
    else:
        W_merged = base.weight.detach().double()
        W_merged = W_merged.t() if layer_name == "conv1d_tf" else W_merged
        _assert_close(W_merged, W0 + total, wdt, "merged weight")
        with torch.no_grad(), autocast(dt_name):
            _assert_close(model(x), ref, _merged_tol_dtype(layer_name, wdt, out_tol_dtype), "merged forward")
    W_merged_raw = layer.get_base_layer().weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()  # merging again is a no-op
    assert torch.equal(layer.get_base_layer().weight.detach(), W_merged_raw) if not layer_name.startswith("bnb") else True
    model.unmerge_adapter()
    assert not layer.merged
    W_after = layer.get_base_layer().weight.detach()
    assert torch.equal(W_after, W_before), "unmerge must restore W0 bit for bit"
    with torch.no_grad(), autocast(dt_name):
        assert torch.equal(model(x), y), "unmerged output must equal the output before merging"
    # safe_merge merges the same weight when it is finite
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(safe_merge=True)
    if not layer_name.startswith("bnb"):
        assert torch.equal(layer.get_base_layer().weight.detach(), W_merged_raw)
    layer.unmerge()


def _check_requantised(layer, layer_name, W_ref):
    """The merged bitsandbytes weight is W0 + ΔW quantised once: compare with quantising the fp64 reference the same
    way (a few elements may land one quantisation step apart where rounding of the inputs differs)."""
    base = layer.get_base_layer()
    expect = bnb_quantised_like(base, W_ref)
    got = dequantized(base)
    off = (got - expect).abs() > 1e-6
    assert off.float().mean() < 0.02, f"{int(off.sum())} of {off.numel()} merged weights differ from re-quantising W0+ΔW"
    assert rel(got, expect) < 0.02, rel(got, expect)


def _save_load(model, layer_name, variant, dt_name, x, y, tmp_path):
    wdt, upcast, _ = DTYPES[dt_name]
    model.save_pretrained(tmp_path / "adapter")
    fresh = build(layer_name, dt_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter", autocast_adapter_dtype=upcast)
    model.eval()  # the loaded model is in eval mode (bitsandbytes' 8-bit matmul differs between the modes)
    with torch.no_grad(), autocast(dt_name):
        y_loaded, y = loaded(x), model(x)
    model.train()
    assert torch.equal(y_loaded, y), "save/load must reproduce the output exactly"
    assert not any(p.requires_grad for p in loaded.parameters()), "an adapter loaded for inference is frozen"


# ================================================================================================ two adapters

PLAIN_AS_FAMILY = {"variant": "hilora", "hilora_r2": 0}

# name: (layer, first adapter's fields, second adapter's fields, dtype setting, second adapter upcast to fp32)
PAIRS = {
    "hira+hira_r2": ("linear", {}, {"r": 2}, "fp32", True),
    # Plain HiRA next to a family member: PEFT refuses to mix peft types (test below); HiLoRA with r2=0 is exactly
    # HiRA with the family's type, so it is how plain HiRA sits next to a family adapter.
    "hira_as_family+hilora": ("linear", PLAIN_AS_FAMILY, VARIANTS["hilora"], "fp32", True),
    "hira_as_family+hilora_conv1d_tf": ("conv1d_tf", PLAIN_AS_FAMILY, VARIANTS["hilora"], "bf16_adapters_fp32", True),
    "bhra+random": ("linear", VARIANTS["bhra"], VARIANTS["random"], "fp32", True),
    "sb+hira_as_family": ("linear", VARIANTS["sb"], PLAIN_AS_FAMILY, "bf16_adapters_fp32", True),
    "fused+dense": ("linear", {}, {"fused": False}, "fp32", True),
    "merged+split_autocast": ("linear", {}, {"half_precision_forward": "split"}, "bf16_adapters_fp32_autocast", True),
    "adapters_fp32+bf16": ("linear", {}, {}, "bf16_adapters_fp32", False),
    "conv2d_fused+dense": ("conv2d_1x3", {}, {"fused": False}, "fp32", True),
    "embedding_two": ("embedding_embed_scale", {}, {"r": 2}, "fp32", True),
    "bnb4_hira_as_family+random": ("bnb_4bit", PLAIN_AS_FAMILY, VARIANTS["random"], "fp32", True),
}


def _two(name):
    layer_name, first, second, dt_name, upcast2 = PAIRS[name]
    net = build(layer_name, dt_name)
    kw = {"r": 4, "target_modules": ["layer"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(net, hira.HiraConfig(**{**kw, **first}), autocast_adapter_dtype=DTYPES[dt_name][1])
        model.add_adapter("other", hira.HiraConfig(**{**kw, **second}), autocast_adapter_dtype=upcast2)
    randomize(model, layer_name, adapters=("default", "other"), rel_size=0.2)
    return model, layer_name, dt_name


def _param_tol(work, p):
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return TOL[max(work, p.dtype, key=order.index)]


@pytest.mark.parametrize("name", list(PAIRS))
def test_two_adapters(name):
    model, layer_name, dt_name = _two(name)
    layer = layer_of(model)
    x = make_input(layer_name, dt_name)
    wdt, _, ac = DTYPES[dt_name]
    # options stay per adapter: adding the second never changes how the first is computed
    first, second = PAIRS[name][1], PAIRS[name][2]
    assert layer.hira_runtime["default"].fused == first.get("fused", True)
    assert layer.hira_runtime["other"].half_mode == second.get("half_precision_forward", "merged")
    params = [p for a in ("default", "other") for p in factors(layer, a).values()]
    gdt, work = compute_dtypes_of(dt_name, params[0].dtype)
    for p in params:
        work = torch.promote_types(work, p.dtype) if ac is None else work
    kind = kind_of(layer_name)
    out_dtype = wdt if kind == "embedding" else gdt

    for active in (["default"], ["other"], ["default", "other"]):
        model.base_model.set_adapter(active)
        ref, leaves = reference(model, layer_name, x, adapters=active, requires_grad=True)
        with autocast(dt_name):
            y = model(x)
        _assert_close(y, ref, out_dtype, f"forward {active}")
        names = [(a, k) for a in active for k, p in factors(layer, a).items() if p.requires_grad and p.numel()]
        assert names and all(factors(layer, a)[k].requires_grad for a, k in names)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y.dtype)
        grads = torch.autograd.grad(y, [factors(layer, a)[k] for a, k in names], g)
        ref_grads = torch.autograd.grad(ref, [leaves[a][k] for a, k in names], g.double())
        for (a, k), gr, rg in zip(names, grads, ref_grads):
            err = rel(gr, rg)
            tol = _param_tol(work if kind != "embedding" else torch.float32, factors(layer, a)[k])
            assert err <= tol, f"grad {a}.{k} with {active} active: {err:.3g} > {tol:.1g}"
    with torch.no_grad(), model.disable_adapter(), autocast(dt_name):
        y_base = model(x)
    assert rel(y_base, ref) > 0.05

    # merging one adapter at a time == both at once; a forward with an active, unmerged adapter is refused
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad(), autocast(dt_name):
        y_both = model(x)
    W0_raw = layer.get_base_layer().weight.detach().clone()
    W_ref = ref_weight(model, layer_name, ("default", "other"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(adapter_names=["default"])
        with pytest.raises(RuntimeError, match="active but not merged"):
            model(x)
        layer.merge(adapter_names=["other"])
        W_one_by_one = layer.get_base_layer().weight.detach().clone()
        layer.unmerge()
        assert torch.equal(layer.get_base_layer().weight.detach(), W0_raw)
        layer.merge(adapter_names=["default", "other"])
    if not layer_name.startswith("bnb"):
        assert torch.equal(layer.get_base_layer().weight.detach(), W_one_by_one)
        with torch.no_grad(), autocast(dt_name):
            _assert_close(model(x), ref, _merged_tol_dtype(layer_name, wdt, out_dtype), "merged pair")
    else:
        _check_requantised(layer, layer_name, W_ref)
    layer.unmerge()
    with torch.no_grad(), autocast(dt_name):
        assert torch.equal(model(x), y_both)


def ref_weight(model, layer_name, adapters):
    """W0 + ΣΔW (fp64) of an unmerged layer."""
    layer = layer_of(model)
    assert not layer.merged
    W0 = base_weight_oi(layer, layer_name)
    total = W0.clone()
    for a in adapters:
        fs = {k: v.detach().double() for k, v in factors(layer, a).items()}
        total = total + ref_delta(model.peft_config[a], W0, {**fs, **stored_modulator(layer, a)}, kind_of(layer_name))
    return total


def test_plain_next_to_family_is_refused_and_hilora_r2_0_is_plain_hira():
    model = adapt("linear", "hira", "fp32")
    with pytest.raises(ValueError, match="different peft types"):
        model.add_adapter("other", config("linear", "hilora"))
    # HiLoRA with r2 = 0 computes exactly plain HiRA (same tensors, same output), with the family's peft type
    as_family = adapt("linear", "hira", "fp32", **{})
    fam = build("linear", "fp32")
    fam = get_peft_model(fam, hira.HiraConfig(r=4, target_modules=["layer"], **PLAIN_AS_FAMILY))
    assert fam.peft_config["default"].peft_type == hira.HiraFamilyType.HIRA_FAMILY
    randomize(as_family, "linear")
    with torch.no_grad():
        for k, p in factors(layer_of(as_family), "default").items():
            factors(layer_of(fam), "default")[k].copy_(p)
        x = make_input("linear", "fp32")
        assert torch.equal(fam(x), as_family(x))
