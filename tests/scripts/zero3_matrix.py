"""Every HiRA layer type under DeepSpeed ZeRO-3 (one process, gloo, CPU) against the same model without DeepSpeed.

    torchrun --nproc_per_node 1 tests/scripts/zero3_matrix.py --out results.json

Per case: forward and factor gradients through the engine, a forward that bypasses DeepSpeed's module hooks (the
tuner's own gathering must fetch the partitioned W0 and factors), merge/unmerge on the engine's module, the dense
ΔW for analysis, and how many parameters the tuner itself gathered at each site. The parent test compares.
"""

import argparse
import copy
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the tiny layer tables
from tiny_layers import build, make_input  # noqa: E402


# name: (layer of tests/tiny_layers.py, HiraConfig fields)
CASES = {
    "linear": ("linear", {}),
    "conv1d_tf": ("conv1d_tf", {}),
    "embedding": ("embedding", {}),
    "conv2d_1x3": ("conv2d_1x3", {}),
    "conv3d_1x1x3": ("conv3d_1x1x3", {}),
    "linear_hilora": ("linear", {"variant": "hilora", "hilora_r2": 2}),
    "linear_bhra": ("linear", {"variant": "bhra", "bhra_blocks": 2}),
    "linear_sb": ("linear", {"variant": "sb"}),
    "linear_lowrank": ("linear", {"modulator": "lowrank", "modulator_rank": 3}),
    "linear_random": ("linear", {"modulator": "random"}),
}


def max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


def run_case(layer_name, extra):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from peft import get_peft_model

    import hira
    from hira import _zero3

    model = get_peft_model(build(layer_name, "fp32"), hira.HiraConfig(r=4, target_modules=["layer"], **extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = make_input(layer_name, "fp32")

    plain = copy.deepcopy(model)
    y_ref = plain(x)
    gvec = torch.randn(y_ref.shape, generator=g)
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    (y_ref * gvec).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    delta_ref = plain.base_model.model.layer.get_additive_delta("default")
    merged = copy.deepcopy(plain)
    with torch.no_grad():
        merged.merge_adapter()
        y_merged_ref = merged(x)

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0},
        "zero_allow_untested_optimizer": True,
    }
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    out = {"partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in engine.module.parameters())}
    _zero3.gathered.clear()

    y = engine(x)
    out["forward"] = max_diff(y, y_ref)
    engine.backward((y * gvec).sum())
    params = dict(engine.module.named_parameters())
    out["grads"] = {n: max_diff(safe_get_full_grad(params[n]), grads_ref[n]) for n in names}
    out["grad_scale"] = max(float(v.abs().max()) for v in grads_ref.values())
    out["gathered_by_engine_pass"] = dict(_zero3.gathered)
    _zero3.gathered.clear()

    layer = engine.module.base_model.model.layer
    with torch.no_grad():
        y_bypass = layer.forward(x)  # no DeepSpeed module hooks: the tuner gathers W0 and the factors itself
    out["bypass_forward"] = max_diff(y_bypass, y_ref)
    out["gathered_bypass"] = dict(_zero3.gathered)
    _zero3.gathered.clear()
    # ... and its backward: the partitions released after forward are gathered again by the tuner's Function
    factor_names = [n for n in names if n.startswith("base_model.model.layer.")]
    y_bypass = layer.forward(x)
    bypass_grads = torch.autograd.grad((y_bypass * gvec).sum(), [params[n] for n in factor_names])
    out["bypass_grads"] = {n: max_diff(gr, grads_ref[n]) for n, gr in zip(factor_names, bypass_grads)}
    out["gathered_bypass_backward"] = dict(_zero3.gathered)
    _zero3.gathered.clear()

    out["delta"] = max_diff(layer.get_additive_delta("default"), delta_ref)
    out["gathered_delta"] = dict(_zero3.gathered)
    _zero3.gathered.clear()

    with torch.no_grad():
        engine.module.merge_adapter()
        out["gathered_merge"] = dict(_zero3.gathered)
        out["merged_forward"] = max_diff(engine(x), y_merged_ref)
        engine.module.unmerge_adapter()
        out["unmerged_forward"] = max_diff(engine(x), y_ref)
    with torch.no_grad(), engine.module.disable_adapter():
        out["base_vs_adapted"] = max_diff(engine(x), y_ref)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {name: run_case(*spec) for name, spec in CASES.items()}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
