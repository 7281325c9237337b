#!/usr/bin/env python
"""Benchmark the fused HiRA tuner against stock PEFT HiRA, PEFT LoRA, a frozen base and full fine-tuning (CPU).

Parts (``--parts``, comma-separated):

* ``layer``: forward+backward of one adapted ``nn.Linear`` (bias-free, fp32) at Llama-like shapes scaled to a CPU
  (2048×2048 for Llama-3-8B's 4096×4096 q/o projections, 2048→5632 for its 4096→14336 up projection), for every
  token count × rank in the grid. Only the input and the adapter (or, for ``full``, the weight) require grad.
* ``model``: one training step (forward + ``loss.backward()`` + ``AdamW.step()`` + ``zero_grad``) of two small
  random-init Llama models: ``lin`` (hidden 1024, inter 2752, 4 layers, vocab 4096: the adapted linears dominate)
  and ``vocab`` (hidden 512, inter 1376, 4 layers, vocab 32000: lm_head + cross-entropy dominate).
  Targets: q_proj, k_proj, v_proj, up_proj, down_proj.
* ``memory``: (i) saved-tensor audit: bytes of the unique storages autograd keeps for backward, split into parameters
  and activations ("held for backward" = activations, i.e. everything that is not a parameter); (ii) RSS in a fresh
  child process per variant (glibc returning freed memory, ``MALLOC_MMAP_THRESHOLD_=65536``): retained after forward
  and peak increment (VmHWM) during the step.
* ``precision``: the bf16 policy of the fused path: ``half_precision_forward="split"`` vs ``"merged"`` vs stock PEFT,
  against an fp64 reference (one layer) and against an fp32 training run (a few AdamW steps of a tiny Llama).

Methodology (see ../shared/research/perf-anchors.md): one process; every variant is built from the same seed and gets
the same inputs; warm-up, then repeats interleaved with the variant order rotated every repeat; reported are median
times and the *median of per-repeat paired ratios*. For stable timings run under
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456`` (the script re-executes itself
with them unless ``--no-malloc-env``) so freed d×k temporaries are reused instead of page-faulted in again.

Stock PEFT HiRA: ``import hira`` re-points ``peft.HiraConfig`` to our tuner, so the stock variant is built with
stock PEFT's own tuner class (``peft.tuners.hira.model.HiraModel``) directly; the script asserts that every adapted
module of that variant is exactly ``peft.tuners.hira.layer.Linear`` (stock forward) and that ours are not.

    python bench/bench_tuner.py --mode quick            # < 3 min: the target cells + both models + memory
    python bench/bench_tuner.py --mode full             # the token × rank grid, more repeats (~25 min)
    python bench/bench_tuner.py --parts precision       # the bf16 policy table
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

MALLOC_TIMING_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
MALLOC_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

LAYER_VARIANTS = ["base", "full", "lora", "stock", "ours"]
MODEL_VARIANTS = ["full", "lora", "stock", "ours"]
MODELS = {
    # name: (hidden, intermediate, layers, heads, vocab)
    "lin": (1024, 2752, 4, 16, 4096),
    "vocab": (512, 1376, 4, 8, 32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
DEV = torch.device("cpu")  # --device
AUTOCAST = None  # --autocast bf16: every variant's forward runs under torch.autocast(DEV, bf16)


def _policy(v):
    """``ours`` = hira.HiraConfig's default half-precision policy; ``oursm`` = "merged"; ``ourss`` = "split"."""
    return {"oursm": "merged", "ourss": "split"}.get(v)


def layer_variants():
    return LAYER_VARIANTS + (["oursm", "ourss"] if AUTOCAST else [])


def model_variants():
    return MODEL_VARIANTS + (["oursm", "ourss"] if AUTOCAST else [])


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def amp():
    if AUTOCAST is None:
        return torch.autocast(DEV.type, enabled=False)
    return torch.autocast(DEV.type, dtype=AUTOCAST)


# ------------------------------------------------------------------------------------------------------ builders


class One(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def _stock_hira(model, r, targets, dropout=0.0):
    """Stock PEFT HiRA, independent of whether ``hira`` was imported (it re-points peft.HiraConfig's mapping)."""
    import peft
    from peft.tuners.hira.layer import Linear as StockLinear
    from peft.tuners.hira.model import HiraModel as StockHiraModel

    cfg = peft.HiraConfig(r=r, target_modules=targets, hira_dropout=dropout)
    tuned = StockHiraModel(model, cfg, "default")
    mods = [m for m in tuned.modules() if isinstance(m, StockLinear)]
    assert mods and all(type(m) is StockLinear for m in mods), "stock variant must run stock PEFT's forward"
    return tuned


def _ours_hira(model, r, targets, **kw):
    import hira
    from peft import get_peft_model
    from peft.tuners.hira.layer import Linear as StockLinear

    kw = {k: v for k, v in kw.items() if v is not None}  # None: keep the config default
    tuned = get_peft_model(model, hira.HiraConfig(r=r, target_modules=targets, **kw))
    mods = [m for m in tuned.modules() if isinstance(m, StockLinear)]
    assert mods and all(type(m) is not StockLinear and all(o.fused for o in m.hira_runtime.values()) for m in mods), \
        "ours must be the fused tuner"
    return tuned


def _lora(model, r, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets))


def _set_B(model, key, seed, b_std=0.02):
    """Give every B factor (``key``: "hira_B" or "lora_B") a nonzero value, the same for stock and ours: B = 0 hides
    bugs and is atypical mid-training."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if key in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * b_std)


def _adapt(m, v, r, targets, seed):
    """Wrap ``m`` for adapter variant ``v`` (lora / stock / ours*) with the same seeds in the layer and model benches."""
    torch.manual_seed(seed + 1)
    if v == "lora":
        m = _lora(m, r, targets)
        _set_B(m, "lora_B", seed + 2)
    elif v == "stock":
        m = _stock_hira(m, r, targets)
        _set_B(m, "hira_B", seed + 2)
    elif v in ("ours", "oursm", "ourss"):
        m = _ours_hira(m, r, targets, half_precision_forward=_policy(v))
        _set_B(m, "hira_B", seed + 2)
    else:
        raise ValueError(f"unknown variant {v!r}")
    return m


def build_layer_variants(d_in, d_out, r, variants, seed=0):
    torch.manual_seed(seed)
    base = One(d_in, d_out)
    out = {}
    for v in variants:
        m = copy.deepcopy(base)
        if v == "base":
            m.requires_grad_(False)
        elif v == "full":
            m.requires_grad_(True)
        else:
            m = _adapt(m, v, r, ["lin"], seed)
        out[v] = m.to(DEV)
    return out


def llama_config(name):
    from transformers import LlamaConfig

    h, inter, L, heads, vocab = MODELS[name]
    return LlamaConfig(
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=L,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def build_model_variants(name, r, variants, seed=0, cfg=None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg or llama_config(name))
    base.config.use_cache = False
    out = {}
    for v in variants:
        m = copy.deepcopy(base)
        if v == "full":
            m.requires_grad_(True)
        else:
            m = _adapt(m, v, r, TARGETS, seed)
        m = m.to(DEV)
        m.train()
        out[v] = m
    del base
    return out


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------------ timing


def _clear_grads(module, x=None):
    for p in module.parameters():
        p.grad = None
    if x is not None:
        x.grad = None


class LayerRunner:
    def __init__(self, module, x, g):
        self.m, self.x, self.g = module, x, g

    def __call__(self):
        _clear_grads(self.m, self.x)
        sync()
        t0 = time.perf_counter()
        with amp():
            y = self.m(self.x)
        sync()
        t1 = time.perf_counter()
        y.backward(self.g.to(y.dtype))
        sync()
        t2 = time.perf_counter()
        del y
        return {"fwd": t1 - t0, "bwd": t2 - t1, "total": t2 - t0}


class StepRunner:
    def __init__(self, model, ids):
        self.m, self.ids = model, ids
        self.opt = torch.optim.AdamW(trainable(model), lr=1e-5)

    def __call__(self):
        sync()
        t0 = time.perf_counter()
        with amp():
            loss = self.m(input_ids=self.ids, labels=self.ids).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        self.last_loss = loss.item()
        return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "total": t3 - t0}


def interleaved(runners: dict, repeats: int, warmup: int = 1):
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    times = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            gc.collect()
            times[n].append(runners[n]())
    return times


def med(times, key="total"):
    return statistics.median(t[key] for t in times)


def paired(times, a, b, key="total"):
    """Median over repeats of t_a/t_b (same repeat = same machine state), and the min/min ratio."""
    ra = [ta[key] / tb[key] for ta, tb in zip(times[a], times[b])]
    return statistics.median(ra), min(t[key] for t in times[a]) / min(t[key] for t in times[b])


# ------------------------------------------------------------------------------------------------------ memory


def saved_tensor_audit(fn, params, inputs=()):
    """Run ``fn()`` (a forward) under saved_tensors_hooks; return bytes of unique storages by kind, and the result."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}
    shapes = []

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen:
            kind = "param" if key in param_ptrs else ("input" if key in input_ptrs else "activation")
            seen[key] = (kind, st.nbytes())
            if kind == "activation" and st.nbytes() >= (1 << 20):
                shapes.append((tuple(t.shape), str(t.dtype)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    by = {"param": 0, "input": 0, "activation": 0}
    for kind, nb in seen.values():
        by[kind] += nb
    by["big_activation_shapes"] = sorted(set(shapes))[:8]
    return by, out


def _rss_kb():
    s = open("/proc/self/status").read()
    return {k: int(v) for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+)", s)}


def mem_child(spec):
    """Fresh-process RSS measurement of one variant (run with MALLOC_MMAP_THRESHOLD_ so frees return to the OS)."""
    torch.set_num_threads(spec.get("threads", 2))
    if spec["kind"] == "layer":
        mods = build_layer_variants(spec["d_in"], spec["d_out"], spec["r"], [spec["variant"]])
        m = mods[spec["variant"]]
        torch.manual_seed(123)
        x = torch.randn(spec["n"], spec["d_in"], device=DEV, requires_grad=True)
        g = torch.randn(spec["n"], spec["d_out"], device=DEV)
        run_fwd = lambda: m(x)  # noqa: E731

        def run_bwd(y):
            y.backward(g.to(y.dtype))

        def run_after():
            _clear_grads(m, x)

        opt = None
    else:
        mods = build_model_variants(spec["model"], spec["r"], [spec["variant"]])
        m = mods[spec["variant"]]
        torch.manual_seed(123)
        ids = torch.randint(0, MODELS[spec["model"]][4], (spec["batch"], spec["seq"])).to(DEV)
        opt = torch.optim.AdamW(trainable(m), lr=1e-5)
        run_fwd = lambda: m(input_ids=ids, labels=ids).loss  # noqa: E731

        def run_bwd(loss):
            loss.backward()
            opt.step()

        def run_after():
            opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (AdamW state exists after this)
        with amp():
            y = run_fwd()
        run_bwd(y)
        del y
        run_after()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    r0 = _rss_kb()["VmRSS"]
    with amp():
        y = run_fwd()
    r1 = _rss_kb()["VmRSS"]
    run_bwd(y)
    del y
    peak = _rss_kb()["VmHWM"]
    run_after()
    return {"rss_before_mb": r0 / 1024, "retained_after_fwd_mb": (r1 - r0) / 1024, "peak_incr_mb": (peak - r0) / 1024}


def cuda_mem(spec):
    """GPU version of mem_child, in process: allocator bytes instead of RSS."""
    if spec["kind"] == "layer":
        m = build_layer_variants(spec["d_in"], spec["d_out"], spec["r"], [spec["variant"]])[spec["variant"]]
        x = torch.randn(spec["n"], spec["d_in"], device=DEV, requires_grad=True)
        g = torch.randn(spec["n"], spec["d_out"], device=DEV)
        fwd, bwd, after = (lambda: m(x)), (lambda y: y.backward(g.to(y.dtype))), (lambda: _clear_grads(m, x))
    else:
        m = build_model_variants(spec["model"], spec["r"], [spec["variant"]])[spec["variant"]]
        ids = torch.randint(0, MODELS[spec["model"]][4], (spec["batch"], spec["seq"])).to(DEV)
        opt = torch.optim.AdamW(trainable(m), lr=1e-5)
        fwd = lambda: m(input_ids=ids, labels=ids).loss  # noqa: E731

        def bwd(loss):
            loss.backward()
            opt.step()

        after = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    for _ in range(2):
        with amp():
            y = fwd()
        bwd(y)
        del y
        after()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    a0 = torch.cuda.memory_allocated()
    with amp():
        y = fwd()
    a1 = torch.cuda.memory_allocated()
    bwd(y)
    del y
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    after()
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return {"rss_before_mb": a0 / 2**20, "retained_after_fwd_mb": (a1 - a0) / 2**20, "peak_incr_mb": (peak - a0) / 2**20}


def run_mem_child(spec):
    if DEV.type == "cuda":
        return cuda_mem(spec)
    env = dict(os.environ)
    for k in MALLOC_TIMING_ENV:
        env.pop(k, None)
    env.update(MALLOC_MEMORY_ENV)
    env["BENCH_TUNER_CHILD"] = "1"
    spec = dict(spec, autocast=AUTOCAST is not None)
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", json.dumps(spec)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ parts


def fmt_row(cells, widths):
    return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"


def bench_layer(shapes, tokens, ranks, repeats, results):
    print("\n## Layer: forward+backward of one adapted linear (fp32, bias-free)")
    print("times in ms (median); ratios are medians of per-repeat paired ratios [min/min in brackets]")
    for d_in, d_out in shapes:
        for r in ranks:
            for n in tokens:
                mods = build_layer_variants(d_in, d_out, r, layer_variants())
                torch.manual_seed(123)
                x = torch.randn(n, d_in, device=DEV, requires_grad=True)
                g = torch.randn(n, d_out, device=DEV)
                # numerics sanity: ours vs stock (same factors)
                ys = {}
                for v in ("stock", "ours"):
                    _clear_grads(mods[v], x)
                    with amp():
                        y = mods[v](x)
                    y.backward(g.to(y.dtype))
                    gB = [p.grad.clone() for nme, p in mods[v].named_parameters() if "hira_B" in nme][0]
                    gA = [p.grad.clone() for nme, p in mods[v].named_parameters() if "hira_A" in nme][0]
                    ys[v] = (y.detach(), x.grad.clone(), gA, gB)
                rel = [
                    float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(ys["ours"], ys["stock"])
                ]
                del ys
                runners = {v: LayerRunner(mods[v], x, g) for v in layer_variants()}
                t = interleaved(runners, repeats)
                cell = {
                    "d_in": d_in,
                    "d_out": d_out,
                    "r": r,
                    "n": n,
                    "repeats": repeats,
                    "median_ms": {v: {k: 1e3 * med(t[v], k) for k in ("fwd", "bwd", "total")} for v in t},
                    "ratios": {},
                    "ours_vs_stock_maxrel": dict(zip(["y", "gx", "gA", "gB"], rel)),
                }
                for a, b in [("ours", "stock"), ("ours", "lora"), ("ours", "base"), ("stock", "lora"),
                             ("full", "lora"), ("lora", "base"), ("stock", "base")]:
                    cell["ratios"][f"{a}/{b}"] = paired(t, a, b)
                if AUTOCAST:
                    for a, b in [(o, c) for o in ("oursm", "ourss") for c in ("lora", "stock", "base")]:
                        cell["ratios"][f"{a}/{b}"] = paired(t, a, b)
                results["layer"].append(cell)
                print(f"\n{d_in}->{d_out}, n={n}, r={r}, {repeats} repeats; ours vs stock max rel diff "
                      + ", ".join(f"{k} {v:.1e}" for k, v in cell["ours_vs_stock_maxrel"].items()))
                w = [6, 7, 7, 8]
                print(fmt_row(["var", "fwd", "bwd", "fwd+bwd"], w))
                for v in layer_variants():
                    mm = cell["median_ms"][v]
                    print(fmt_row([v, f"{mm['fwd']:.1f}", f"{mm['bwd']:.1f}", f"{mm['total']:.1f}"], w))
                print("  " + "  ".join(f"{k}={p:.2f} [{q:.2f}]" for k, (p, q) in cell["ratios"].items()))
                del mods, runners
                gc.collect()


def bench_model(models, r, batch, seq, repeats, results):
    print(f"\n## Model: one training step (fwd + backward + AdamW), fp32, r={r}, batch {batch}x{seq} tokens")
    for name in models:
        mods = build_model_variants(name, r, model_variants())
        torch.manual_seed(123)
        ids = torch.randint(0, MODELS[name][4], (batch, seq)).to(DEV)
        runners = {v: StepRunner(mods[v], ids) for v in model_variants()}
        t = interleaved(runners, repeats, warmup=2)
        cell = {
            "model": name,
            "shape": dict(zip(["hidden", "inter", "layers", "heads", "vocab"], MODELS[name])),
            "r": r,
            "batch": batch,
            "seq": seq,
            "repeats": repeats,
            "trainable": {v: sum(p.numel() for p in trainable(mods[v])) for v in mods},
            "median_s": {v: {k: med(t[v], k) for k in ("fwd", "bwd", "opt", "total")} for v in t},
            "ratios": {},
            "last_loss": {v: runners[v].last_loss for v in runners},
        }
        for a, b in [("ours", "stock"), ("ours", "lora"), ("stock", "lora"), ("full", "lora"), ("ours", "full")] + (
                [(o, c) for o in ("oursm", "ourss") for c in ("lora", "stock")] if AUTOCAST else []):
            cell["ratios"][f"{a}/{b}"] = paired(t, a, b)
        results["model"].append(cell)
        print(f"\n{name}: hidden {MODELS[name][0]}, inter {MODELS[name][1]}, {MODELS[name][2]} layers, "
              f"vocab {MODELS[name][4]}; {repeats} repeats")
        w = [6, 11, 7, 7, 7, 8]
        print(fmt_row(["var", "trainable", "fwd", "bwd", "opt", "step(s)"], w))
        for v in model_variants():
            mm = cell["median_s"][v]
            print(fmt_row([v, f"{cell['trainable'][v]/1e6:.2f}M", f"{mm['fwd']:.3f}", f"{mm['bwd']:.3f}",
                           f"{mm['opt']:.3f}", f"{mm['total']:.3f}"], w))
        print("  " + "  ".join(f"{k}={p:.2f} [{q:.2f}]" for k, (p, q) in cell["ratios"].items()))
        del mods, runners
        gc.collect()


def bench_memory(layer_cells, models, r, batch, seq, results, rss=True, model_rss=True):
    print("\n## Memory held for backward (saved-tensor audit; MB of unique non-parameter storages, x included)")
    for d_in, d_out, n in layer_cells:
        mods = build_layer_variants(d_in, d_out, r, layer_variants())
        torch.manual_seed(123)
        x = torch.randn(n, d_in, device=DEV, requires_grad=True)
        row = {"kind": "layer", "d_in": d_in, "d_out": d_out, "n": n, "r": r, "variants": {}}
        for v, m in mods.items():
            with amp():
                by, y = saved_tensor_audit(lambda: m(x), list(m.parameters()), (x,))
            del y
            rec = {
                "saved_activation_mb": by["activation"] / 2**20,
                "saved_input_mb": by["input"] / 2**20,
                "held_mb": (by["activation"] + by["input"]) / 2**20,
                "saved_param_mb": by["param"] / 2**20,
                "big_activation_shapes": by["big_activation_shapes"],
            }
            if rss:
                rec.update(run_mem_child({"kind": "layer", "d_in": d_in, "d_out": d_out, "n": n, "r": r,
                                          "variant": v}))
            row["variants"][v] = rec
        results["memory"].append(row)
        _print_mem(row, f"layer {d_in}->{d_out}, n={n}, r={r}")
        del mods
        gc.collect()
    for name in models:
        mods = build_model_variants(name, r, model_variants())
        torch.manual_seed(123)
        ids = torch.randint(0, MODELS[name][4], (batch, seq)).to(DEV)
        row = {"kind": "model", "model": name, "batch": batch, "seq": seq, "r": r, "variants": {}}
        for v, m in mods.items():
            with amp():
                    by, loss = saved_tensor_audit(lambda: m(input_ids=ids, labels=ids).loss, list(m.parameters()), (ids,))
            del loss
            rec = {
                "saved_activation_mb": by["activation"] / 2**20,
                "saved_input_mb": by["input"] / 2**20,
                "held_mb": (by["activation"] + by["input"]) / 2**20,
                "saved_param_mb": by["param"] / 2**20,
                "big_activation_shapes": by["big_activation_shapes"],
            }
            if rss and model_rss:
                rec.update(run_mem_child({"kind": "model", "model": name, "r": r, "batch": batch, "seq": seq,
                                          "variant": v}))
            row["variants"][v] = rec
        results["memory"].append(row)
        _print_mem(row, f"model {name}, {batch}x{seq}, r={r}")
        del mods
        gc.collect()


def _print_mem(row, title):
    print(f"\n{title}")
    w = [6, 10, 10, 14, 10]
    print(fmt_row(["var", "held MB", "x/ids MB", "RSS fwd MB", "peak MB"], w))
    for v, rec in row["variants"].items():
        print(fmt_row([v, f"{rec['held_mb']:.1f}", f"{rec['saved_input_mb']:.1f}",
                       f"{rec.get('retained_after_fwd_mb', float('nan')):.0f}",
                       f"{rec.get('peak_incr_mb', float('nan')):.0f}"], w))
    big = row["variants"].get("stock", {}).get("big_activation_shapes")
    if big:
        print(f"  stock's largest saved activations: {big}")


# ------------------------------------------------------------------------------------------------------ precision


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def precision_layer(results, d=2048, n=256, r=32, rms_list=(1e-4, 1e-3, 1e-2, 1e-1)):
    """One layer, W0 ~ N(0, 0.02²), fp32 adapters with B·A scaled to rms(M); errors relative to fp64 truth."""
    import hira  # noqa: F401
    from hira.functional import LOW_RANK, Term, hira_linear

    print("\n## Precision: one layer, bf16 compute, fp32 adapters (relative L2 error against fp64)")
    print(f"d=k={d}, n={n}, r={r}. 'update' = y - x·W0ᵀ (the part of the output the adapter contributes).")
    rows = []
    torch.manual_seed(0)
    W32 = (torch.randn(d, d) * 0.02).to(DEV)
    x32 = torch.randn(n, d).to(DEV)
    g32 = torch.randn(n, d).to(DEV)
    A0 = torch.randn(r, d).to(DEV)
    B0 = torch.randn(d, r).to(DEV)
    M0 = B0 @ A0
    for rms in rms_list:
        s = rms / float(M0.pow(2).mean().sqrt())
        A = (A0 * s**0.5).clone()
        B = (B0 * s**0.5).clone()
        for setting in ("bf16-weights", "autocast"):
            # bf16-weights: base weight and x in bf16 (model.to(bf16)), adapters fp32 (PEFT's autocast_adapter_dtype)
            # autocast: fp32 weights and x under torch.autocast("cpu", bf16)
            if setting == "bf16-weights":
                W, x = W32.bfloat16(), x32.bfloat16()
            else:
                W, x = W32, x32
            Wd, xd, Ad, Bd = W.double(), x.double(), A.double(), B.double()
            y_base = xd @ Wd.t()
            y_true = xd @ (Wd * (1 + Bd @ Ad)).t()
            gM = (g32.double().t() @ xd) * Wd
            gA_true, gB_true = Bd.t() @ gM, gM @ Ad.t()
            row = {"rms_M": rms, "setting": setting, "frac_unchanged_bf16": float(
                ((W.float() * (1 + B @ A)).bfloat16() == W.bfloat16()).float().mean())}
            for mode in ("split", "merged", "stock", "fp32"):
                xr = x.clone().requires_grad_(True)
                Ap, Bp = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
                ctx = torch.autocast(DEV.type, dtype=torch.bfloat16) if setting == "autocast" and mode != "fp32" \
                    else torch.autocast(DEV.type, enabled=False)
                with ctx:
                    if mode == "stock":
                        # stock PEFT HiRA forward: base(x) + F.linear(x.to(A.dtype), W0 * (AᵀBᵀ)ᵀ), cast back
                        xin = xr if setting == "autocast" else xr.to(Ap.dtype)
                        base = F.linear(xr, W)
                        y = (base + F.linear(xin, W * torch.mm(Ap.t(), Bp.t()).t())).to(base.dtype)
                    elif mode == "fp32":
                        y = hira_linear(xr.float(), W.float(), None, [Term(xr.float(), LOW_RANK, (Ap, Bp))])
                    else:
                        y = hira_linear(xr, W, None, [Term(xr, LOW_RANK, (Ap, Bp))], half_mode=mode)
                y.backward(g32.to(y.dtype))
                row[mode] = {
                    "y": _rel(y, y_true),
                    "update": _rel(y.double() - y_base, y_true - y_base),
                    "gA": _rel(Ap.grad, gA_true),
                    "gB": _rel(Bp.grad, gB_true),
                    "out_dtype": str(y.dtype).replace("torch.", ""),
                }
            rows.append(row)
    results["precision_layer"] = rows
    w = [7, 13, 9, 8, 14, 14, 14, 14, 9]
    print(fmt_row(["rms(M)", "setting", "unchanged", "mode", "err y", "err update", "err gA", "err gB", "out"], w))
    for row in rows:
        for mode in ("split", "merged", "stock", "fp32"):
            e = row[mode]
            print(fmt_row([f"{row['rms_M']:.0e}", row["setting"], f"{100*row['frac_unchanged_bf16']:.1f}%", mode,
                           f"{e['y']:.2e}", f"{e['update']:.2e}", f"{e['gA']:.2e}", f"{e['gB']:.2e}",
                           e["out_dtype"]], w))


def precision_train(results, steps=30, lr=5e-3, r=8):
    """A tiny Llama trained for a few AdamW steps on fixed data: bf16 policies vs the fp32 run (same init, same data)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.config.use_cache = False
    torch.manual_seed(1)
    # learnable data: arithmetic token sequences (next token = previous + stride mod V); 4 fixed batches of 8×128
    start = torch.randint(0, 1024, (4, 8, 1))
    stride = torch.randint(1, 8, (4, 8, 1))
    data = (start + stride * torch.arange(128)) % 1024
    print(f"\n## Precision: training, tiny Llama (h256, 2 layers, vocab 1024), r={r}, AdamW lr={lr}, {steps} steps")

    def run(variant, setting):
        m = copy.deepcopy(base).to(DEV)
        if setting == "bf16-weights":
            m = m.to(torch.bfloat16)
        torch.manual_seed(2)
        if variant == "stock":
            m = _stock_hira(m, r, TARGETS)
        else:
            m = _ours_hira(m, r, TARGETS, half_precision_forward=variant if variant in ("split", "merged") else "split")
        for p in trainable(m):
            p.data = p.data.float()  # fp32 adapters (PEFT's autocast_adapter_dtype default)
        opt = torch.optim.AdamW(trainable(m), lr=lr)
        losses = []
        for s in range(steps):
            ids = data[s % len(data)].to(DEV)
            ctx = torch.autocast(DEV.type, dtype=torch.bfloat16) if setting == "autocast" else \
                torch.autocast(DEV.type, enabled=False)
            with ctx:
                loss = m(input_ids=ids, labels=ids).loss
            loss.float().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        # final update size: rms of M = B·A (shows whether updates are below bf16 resolution of 1+M)
        Ms = [(mod.hira_B["default"].float() @ mod.hira_A["default"].float()) for mod in m.modules()
              if hasattr(mod, "hira_B") and "default" in getattr(mod, "hira_B", {})]
        rmsM = float(torch.stack([M.pow(2).mean().sqrt() for M in Ms]).mean()) if Ms else float("nan")
        return losses, rmsM

    ref, ref_rms = run("fp32", "fp32")
    rows = {"fp32 (ours, fused)": (ref, ref_rms)}
    for setting in ("autocast", "bf16-weights"):
        for variant in ("split", "merged", "stock"):
            rows[f"{setting}: {variant}"] = run(variant, setting)
    results["precision_train"] = {k: {"losses": v[0], "rms_M_final": v[1]} for k, v in rows.items()}
    pick = [0, 4, 9, steps - 1]
    w = [26] + [9] * len(pick) + [13, 13, 11]
    print(fmt_row(["run"] + [f"loss@{i+1}" for i in pick] + ["max|Δ| vs fp32", "mean|Δ| vs fp32", "rms(M) end"],
                  w))
    for k, (losses, rm) in rows.items():
        dev = [abs(a - b) for a, b in zip(losses, ref)]
        print(fmt_row([k] + [f"{losses[i]:.4f}" for i in pick] + [f"{max(dev):.2e}", f"{statistics.mean(dev):.2e}",
                                                                   f"{rm:.1e}"], w))


# ------------------------------------------------------------------------------------------------------ targets


def targets(results):
    print("\n## Targets")
    verdicts = []

    def check(name, value, op, limit):
        ok = value >= limit if op == ">=" else value <= limit
        verdicts.append({"target": name, "value": value, "op": op, "limit": limit, "pass": ok})
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f} {op} {limit}")

    for c in results["layer"]:
        tag = f"layer {c['d_in']}->{c['d_out']} n={c['n']} r={c['r']}"
        check(f"{tag}: stock/ours speedup", 1 / c["ratios"]["ours/stock"][0], ">=", 1.6)
        if c["n"] >= 2048:
            check(f"{tag}: ours/LoRA", c["ratios"]["ours/lora"][0], "<=", 1.45)
    for c in results["model"]:
        lim = 1.3 if c["model"] == "lin" else 1.05
        check(f"model {c['model']} step: ours/LoRA", c["ratios"]["ours/lora"][0], "<=", lim)
    for row in results["memory"]:
        tag = f"layer {row['d_in']}->{row['d_out']} n={row['n']}" if row["kind"] == "layer" else f"model {row['model']}"
        lo = row["variants"]["lora"]["held_mb"]
        ours = row["variants"]["ours"]["held_mb"]
        check(f"{tag}: held-for-backward ours/LoRA", ours / lo, "<=", 1.10)
    results["targets"] = verdicts


# ------------------------------------------------------------------------------------------------------ main


def machine():
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:
        pass
    import peft
    import transformers

    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else None,
        "autocast": str(AUTOCAST),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_TIMING_ENV},
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["quick", "full"], default="quick")
    ap.add_argument("--parts", default="layer,model,memory", help="comma list of layer,model,memory,precision")
    ap.add_argument("--shapes", default=None, help="e.g. 2048x2048,2048x5632 (in x out)")
    ap.add_argument("--tokens", default=None, help="e.g. 512,2048,4096")
    ap.add_argument("--ranks", default=None, help="e.g. 8,32,128")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--model-repeats", type=int, default=None)
    ap.add_argument("--models", default="lin,vocab")
    ap.add_argument("--r", type=int, default=32, help="rank for the model and memory parts")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS measurements")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--no-malloc-env", action="store_true", help="do not re-exec with the MALLOC_* timing settings")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU: allocator peak instead of RSS)")
    ap.add_argument("--autocast", choices=["bf16"], default=None,
                    help="run every forward under torch.autocast(bf16); adds variants oursm / ourss (half_precision_forward merged / split; ours = the config default)")
    ap.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEV, AUTOCAST

    if args.mem_child:
        spec = json.loads(args.mem_child)
        DEV = torch.device(spec.get("device", "cpu"))
        AUTOCAST = torch.bfloat16 if spec.get("autocast") else None
        print(json.dumps(mem_child(spec)))
        return
    if not args.no_malloc_env and any(os.environ.get(k) != v for k, v in MALLOC_TIMING_ENV.items()):
        env = dict(os.environ, **MALLOC_TIMING_ENV)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)

    DEV = torch.device(args.device)
    AUTOCAST = torch.bfloat16 if args.autocast == "bf16" else None
    if DEV.type == "cpu":
        torch.set_num_threads(args.threads)
    quick = args.mode == "quick"
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or "2048x2048,2048x5632").split(",")]
    tokens = [int(v) for v in (args.tokens or ("2048" if quick else "512,2048,4096")).split(",")]
    ranks = [int(v) for v in (args.ranks or ("32" if quick else "8,32,128")).split(",")]
    repeats = args.repeats or (5 if quick else 9)
    model_repeats = args.model_repeats or (5 if quick else 9)
    models = [m for m in args.models.split(",") if m]
    parts = set(args.parts.split(","))
    results = {"machine": machine(), "args": vars(args), "layer": [], "model": [], "memory": []}
    print(f"# bench_tuner ({args.mode}); {results['machine']}")
    print("Llama-3-8B originals: q/k/v/o 4096x4096 (k/v 4096x1024 under GQA), up/gate 4096->14336, down 14336->4096;"
          " scaled here to 2048x2048 and 2048->5632.")
    t0 = time.time()
    if "layer" in parts:
        bench_layer(shapes, tokens, ranks, repeats, results)
    if "model" in parts:
        bench_model(models, args.r, args.batch, args.seq, model_repeats, results)
    if "memory" in parts:
        cells = [(2048, 5632, 512)] + ([(2048, 5632, 2048), (2048, 2048, 2048)] if not quick else [])
        bench_memory(cells, models, args.r, args.batch, args.seq, results, rss=not args.no_rss, model_rss=not quick)
    if "precision" in parts:
        precision_layer(results)
        precision_train(results)
    if parts & {"layer", "model", "memory"}:
        targets(results)
    results["wall_s"] = time.time() - t0
    results["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print(f"\nwall {results['wall_s']:.0f}s; loadavg start {results['machine']['loadavg_start']} "
          f"end {results['machine']['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
