"""GPU check and benchmark of the fused HiRA path (CUDA, bf16 autocast): correctness, layer time, memory, model step.

Run on a machine with a CUDA GPU::

    python bench/bench_gpu.py --out bench_gpu.json            # ~3-5 minutes on one H100

It measures, in one process with interleaved repeats (medians of per-repeat paired ratios):

* correctness on CUDA: fused vs the dense formula (fp32), and the bf16 policies ("split", "merged") vs an fp64
  reference;
* one adapted linear at Llama-3-8B shapes (4096→4096, 4096→14336, 14336→4096), 2048-8192 tokens, r=32, bf16 base
  weights, fp32 adapters, bf16 autocast — the usual SFT setup: frozen base, LoRA (PEFT), stock PEFT HiRA, ours
  (split / merged), full fine-tuning of the layer; forward+backward time and the memory held between forward and
  backward;
* a training step (forward + backward + AdamW) of a Llama-shaped stack at Llama-3-8B width (4 decoder layers) for
  LoRA, stock PEFT HiRA, ours split, ours merged.

Stock PEFT HiRA is built before ``import hira`` (importing hira re-points PEFT's HIRA type to our tuner), so both
implementations live in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn


def _sync():
    torch.cuda.synchronize()


def _time(fn, warmup=2, reps=1):
    for _ in range(warmup):
        fn()
    _sync()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    _sync()
    return start.elapsed_time(end) / reps


def interleaved(fns: dict, repeats: int, inner: int = 3) -> dict:
    """Median time (ms) per variant and median paired ratios, variants rotated each repeat."""
    names = list(fns)
    times = {n: [] for n in names}
    for n in names:  # warm-up
        _time(fns[n], warmup=2, reps=1)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            times[n].append(_time(fns[n], warmup=0, reps=inner))
    return times


def paired(times, a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# ------------------------------------------------------------------------------------------------ layer variants


def build_layers(d_in, d_out, r, stock_cls, stock_cfg_cls, ours_cfg_cls, peft):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16)
    base.weight.requires_grad_(False)
    variants = {"base": base}
    full = copy.deepcopy(base)
    full.weight.requires_grad_(True)
    variants["full"] = full
    lora = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
    variants["lora"] = lora
    stock = stock_cls(copy.deepcopy(base), "default", config=stock_cfg_cls(r=r, target_modules=["0"]), r=r)
    stock.hira_A["default"].data = stock.hira_A["default"].data.float().cuda()
    stock.hira_B["default"].data = torch.randn(d_out, r, device="cuda") * 1e-3
    variants["stock_hira"] = stock
    for mode in ("split", "merged"):
        ours = peft.get_peft_model(
            nn.Sequential(copy.deepcopy(base)), ours_cfg_cls(r=r, target_modules=["0"], half_precision_forward=mode)
        )
        layer = ours.base_model.model[0]
        layer.hira_A["default"].data.copy_(stock.hira_A["default"].data)
        layer.hira_B["default"].data.copy_(stock.hira_B["default"].data)
        variants[f"ours_{mode}"] = ours
    for m in variants.values():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.data = p.data.float() if ("lora_" in n or "hira_" in n) else p.data
    return variants


def layer_step(module, x, g):
    def fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module(x)
        y.backward(g)
        for p in module.parameters():
            p.grad = None
        x.grad = None

    return fn


def held_memory(module, x):
    """Bytes allocated between forward and backward (activations and saved tensors), beyond the input."""
    _sync()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(x)
    _sync()
    held = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    torch.cuda.reset_peak_memory_stats()
    base_peak = torch.cuda.memory_allocated()
    y.backward(torch.ones_like(y))
    _sync()
    peak = torch.cuda.max_memory_allocated() - base_peak
    for p in module.parameters():
        p.grad = None
    x.grad = None
    del y
    return held, peak


# ------------------------------------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    import peft
    from peft.tuners.hira.layer import Linear as StockLinear

    StockConfig = peft.HiraConfig
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peft": peft.__version__}

    # Stock PEFT HiRA model for the step benchmark, built before `import hira`.
    from transformers import LlamaConfig, LlamaForCausalLM

    n_layers = 2 if args.quick else 4
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=n_layers, vocab_size=32000, max_position_embeddings=4096,
    )
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    stock_model = peft.get_peft_model(copy.deepcopy(base_model), StockConfig(r=32, target_modules=targets))

    import hira  # noqa: E402  (re-points HIRA to our tuner from here on)
    from hira.functional import LOW_RANK, Term, hira_linear

    # ---------------------------------------------------------------- correctness on CUDA
    torch.manual_seed(0)
    W = torch.randn(512, 384, device="cuda") * 0.02
    A = (torch.randn(16, 384, device="cuda") * 0.05).requires_grad_()
    B = (torch.randn(512, 16, device="cuda") * 0.05).requires_grad_()
    x = torch.randn(1024, 384, device="cuda", requires_grad=True)
    y = hira_linear(x, W, None, [Term(x, LOW_RANK, (A, B))])
    ref = F.linear(x, W + W * (B @ A))
    g = torch.randn_like(y)
    gr = torch.autograd.grad(y, (x, A, B), g)
    gr_ref = torch.autograd.grad(ref, (x, A, B), g)
    report["cuda_fp32_max_abs_err"] = {
        "y": (y - ref).abs().max().item(),
        **{k: (a - b).abs().max().item() / b.abs().max().item() for k, a, b in zip(("x", "A", "B"), gr, gr_ref)},
    }
    Wd, xd = W.double(), x.detach().double()
    ref64 = F.linear(xd, Wd + Wd * (B.detach().double() @ A.detach().double()))
    for mode in ("split", "merged"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yb = hira_linear(x.detach(), W.bfloat16(), None, [Term(x.detach(), LOW_RANK, (A, B))], half_mode=mode)
        report[f"cuda_bf16_{mode}_rel_err"] = ((yb.double() - ref64).norm() / ref64.norm()).item()
    print(json.dumps({k: v for k, v in report.items()}, indent=1), flush=True)

    # ---------------------------------------------------------------- one adapted layer
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
    tokens = [2048, 8192] if args.quick else [2048, 4096, 8192]
    layer_rows = []
    for d_in, d_out in shapes:
        variants = build_layers(d_in, d_out, 32, StockLinear, StockConfig, hira.HiraConfig, peft)
        for n in tokens:
            x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(n, d_out, device="cuda", dtype=torch.bfloat16)
            fns = {k: layer_step(m, x, g) for k, m in variants.items()}
            times = interleaved(fns, args.repeats)
            mem = {k: held_memory(m, x) for k, m in variants.items()}
            row = {
                "shape": f"{d_in}->{d_out}", "tokens": n,
                "ms": {k: statistics.median(v) for k, v in times.items()},
                "ours_split/stock": paired(times, "ours_split", "stock_hira"),
                "ours_merged/stock": paired(times, "ours_merged", "stock_hira"),
                "ours_split/lora": paired(times, "ours_split", "lora"),
                "ours_merged/lora": paired(times, "ours_merged", "lora"),
                "stock/lora": paired(times, "stock_hira", "lora"),
                "ours_merged/base": paired(times, "ours_merged", "base"),
                "full/lora": paired(times, "full", "lora"),
                "held_MB": {k: v[0] / 2**20 for k, v in mem.items()},
                "bwd_peak_MB": {k: v[1] / 2**20 for k, v in mem.items()},
            }
            layer_rows.append(row)
            print(json.dumps(row), flush=True)
        del variants
        torch.cuda.empty_cache()
    report["layer"] = layer_rows

    # ---------------------------------------------------------------- model step
    models = {
        "lora": peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(r=32, lora_alpha=64, target_modules=targets)),
        "stock_hira": stock_model,
        "ours_split": peft.get_peft_model(copy.deepcopy(base_model), hira.HiraConfig(r=32, target_modules=targets)),
        "ours_merged": peft.get_peft_model(
            copy.deepcopy(base_model), hira.HiraConfig(r=32, target_modules=targets, half_precision_forward="merged")
        ),
    }
    del base_model
    step_rows = []
    for batch, seq in ([(1, 2048), (4, 2048)] if not args.quick else [(2, 2048)]):
        ids = torch.randint(0, 32000, (batch, seq), device="cuda")
        opts = {}
        fns = {}
        for k, m in models.items():
            for n, p in m.named_parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            params = [p for p in m.parameters() if p.requires_grad]
            opts[k] = torch.optim.AdamW(params, lr=1e-4, fused=True)

            def fn(m=m, opt=opts[k]):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = m(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            fns[k] = fn
        peaks = {}
        for k, fn in fns.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn()
            _sync()
            peaks[k] = torch.cuda.max_memory_allocated() / 2**30
        times = interleaved(fns, max(3, args.repeats // 2), inner=1)
        row = {
            "batch": batch, "seq": seq, "layers": n_layers,
            "ms": {k: statistics.median(v) for k, v in times.items()},
            "ours_split/lora": paired(times, "ours_split", "lora"),
            "ours_merged/lora": paired(times, "ours_merged", "lora"),
            "stock/lora": paired(times, "stock_hira", "lora"),
            "ours_split/stock": paired(times, "ours_split", "stock_hira"),
            "ours_merged/stock": paired(times, "ours_merged", "stock_hira"),
            "peak_GiB": peaks,
        }
        step_rows.append(row)
        print(json.dumps(row), flush=True)
    report["step"] = step_rows
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
