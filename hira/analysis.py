"""Rank analysis of adapter updates (the paper's Fig. 4, Fig. 5, App. C and App. F) for any checkpoint.

    python -m hira.analysis --ckpt runs/hira --ckpt runs/lora [--full_ft runs/full] --out analysis/

For every adapted layer of every ``--ckpt`` (HiRA-family or LoRA adapters; ``import hira`` is done here) the dense
update ``ΔW = W' - W0`` is formed one layer at a time on the accelerator (``--device``, default cuda when available)
and its singular values give:

* ``num_rank``: numerical rank, the number of singular values above ``σ_max · max(d, n) · eps_fp32`` (NumPy's
  ``matrix_rank`` tolerance, for fp32 arithmetic);
* ``n_above``: the number of singular values above ``--sv_threshold`` (0.005, the paper's Fig. 4);
* ``fro2``: the squared Frobenius norm ``‖ΔW‖²_F = Σσ²`` (Fig. 5);
* ``eff_rank``: effective rank (Roy & Vetterli 2007) ``exp(−Σ p_i log p_i)`` with ``p_i = σ_i / Σσ``.

With ``--full_ft DIR`` (a fully fine-tuned model of the same base) the same is computed for its ``ΔW`` and for
``ΔW ⊘ W0`` (entries with ``|W0| < 1e-8`` are left out, i.e. set to 0) on the modules the adapters target.

Outputs in ``--out``: ``analysis.json`` (settings + rows), ``analysis.csv`` and, per metric, ``<metric>.png`` with one
panel per module type, the layer index on the x axis and one line per checkpoint.

``python -m hira.analysis --demo --out DIR`` trains two small adapters (LoRA and HiRA at the same parameter count) and
a full fine-tuning run of a small random Llama on the CPU and analyses them; it produced the plots in docs/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from ._names import layer_index


METRICS = ("num_rank", "n_above", "fro2", "eff_rank")


@dataclass
class Row:
    ckpt: str
    kind: str  # "delta" (adapter ΔW), "full_ft_delta", "full_ft_delta_over_w0"
    module: str
    module_type: str
    layer: int
    shape: tuple
    r: int | None
    num_rank: int
    n_above: int
    fro2: float
    eff_rank: float
    sv_max: float


def spectrum_metrics(M: torch.Tensor, sv_threshold: float = 0.005) -> dict:
    """Rank metrics of one matrix from its singular values (computed in fp32 on M's device)."""
    s = torch.linalg.svdvals(M.float())
    smax = s.max().item() if s.numel() else 0.0
    tol = smax * max(M.shape) * torch.finfo(torch.float32).eps
    total = s.sum()
    if total > 0:
        p = s / total
        p = p[p > 0]
        eff = math.exp(-(p * p.log()).sum().item())
    else:
        eff = 0.0
    return {
        "num_rank": int((s > tol).sum().item()) if smax > 0 else 0,
        "n_above": int((s > sv_threshold).sum().item()),
        "fro2": float(s.double().pow(2).sum().item()),
        "eff_rank": eff,
        "sv_max": smax,
    }


def _module_key(name: str) -> str:
    """Module name relative to the base model (PEFT wrapper prefixes removed)."""
    for pre in ("base_model.model.", "base_model."):
        if name.startswith(pre):
            name = name[len(pre) :]
    return name


def iter_adapter_deltas(peft_model, adapter: str = "default", device=None):
    """Yield ``(module_name, ΔW (out×in, fp32, on device), W0 (out×in), r)`` for every adapted layer, one at a time."""
    from peft.tuners.lora import LoraLayer

    from . import _zero3
    from .layer import HiraFamilyMixin

    for name, mod in peft_model.named_modules():
        if isinstance(mod, HiraFamilyMixin) and adapter in mod.r:
            with _zero3.gather(mod._gather_params([adapter]), site="read"):
                W0 = mod._original_weight_oi().detach().float().clone()
                dW = mod._additive_delta(adapter, W0).float().to(device)
                W0 = W0.to(device)
            yield _module_key(name), dW, W0, mod.r[adapter]
        elif isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}):
            W = mod.get_base_layer().weight
            dW = mod.get_delta_weight(adapter).detach().float().to(device)
            W0 = W.detach().float().to(device)
            if getattr(mod, "fan_in_fan_out", False):
                dW, W0 = dW.t(), W0.t()
            yield _module_key(name), dW, W0, mod.r[adapter]


def _row(ckpt, kind, module, r, shape, m):
    return Row(
        ckpt=ckpt,
        kind=kind,
        module=module,
        module_type=module.rsplit(".", 1)[-1],
        layer=layer_index(module),
        shape=tuple(shape),
        r=r,
        **m,
    )


def _load_base(path_or_name, dtype):
    from transformers import AutoModelForCausalLM

    from .models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(path_or_name), dtype=dtype)


def analyze_checkpoint(ckpt: str, *, base: str | None = None, device=None, sv_threshold=0.005, dtype=torch.float32,
                       label: str | None = None, progress: bool = True):
    """Rows for one adapter directory (HiRA family or LoRA), plus the targeted module names."""
    import hira  # noqa: F401  (registers the HiRA-family tuner before loading)
    from peft import PeftConfig, PeftModel
    from tqdm.auto import tqdm

    cfg = PeftConfig.from_pretrained(ckpt)
    model = PeftModel.from_pretrained(_load_base(base or cfg.base_model_name_or_path, dtype), ckpt)
    label = label or os.path.basename(os.path.normpath(ckpt))
    rows, modules = [], []
    # one layer at a time: each ΔW is formed, reduced to its singular values and freed before the next
    for module, dW, W0, r in tqdm(iter_adapter_deltas(model, device=device), desc=f"SVD {label}", disable=not progress):
        rows.append(_row(label, "delta", module, r, dW.shape, spectrum_metrics(dW, sv_threshold)))
        modules.append(module)
        del dW, W0
    return rows, modules, model


def analyze_full_ft(full_ft: str, base_model, modules, *, device=None, sv_threshold=0.005, dtype=torch.float32,
                    progress: bool = True):
    """Rows for a fully fine-tuned checkpoint: ΔW and ΔW ⊘ W0 of the given modules."""
    from tqdm.auto import tqdm

    ft = _load_base(full_ft, dtype)
    ft_mods = dict(ft.named_modules())
    base_mods = dict(base_model.named_modules())
    rows = []
    for module in tqdm(modules, desc="SVD full FT", disable=not progress):
        mb = base_mods.get(module)
        if mb is None:  # base of a PEFT model: find the wrapped layer
            mb = base_mods.get("base_model.model." + module)
            mb = mb.get_base_layer() if hasattr(mb, "get_base_layer") else mb
        W0 = mb.weight.detach().float().to(device)
        W1 = ft_mods[module].weight.detach().float().to(device)
        if W0.shape != W1.shape:
            raise ValueError(f"{module}: full-FT weight {tuple(W1.shape)} does not match the base {tuple(W0.shape)}.")
        dW = W1 - W0
        rows.append(_row("full_ft", "full_ft_delta", module, None, dW.shape, spectrum_metrics(dW, sv_threshold)))
        ratio = torch.where(W0.abs() > 1e-8, dW / W0.where(W0.abs() > 1e-8, torch.ones_like(W0)), torch.zeros_like(W0))
        rows.append(
            _row("full_ft", "full_ft_delta_over_w0", module, None, dW.shape, spectrum_metrics(ratio, sv_threshold))
        )
    return rows


def write_outputs(rows: list[Row], out: str, settings: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump({"settings": settings, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(os.path.join(out, "analysis.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    plot(rows, out)


_TITLES = {
    "num_rank": "numerical rank of ΔW",
    "n_above": "singular values > threshold",
    "fro2": "‖ΔW‖²_F",
    "eff_rank": "effective rank",
}


def plot(rows: list[Row], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    types = sorted({r.module_type for r in rows})
    series = sorted({(r.ckpt, r.kind) for r in rows})
    paths = []
    for metric in METRICS:
        fig, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 2.8), squeeze=False)
        for ax, t in zip(axes[0], types):
            for ckpt, kind in series:
                pts = sorted((r.layer, getattr(r, metric)) for r in rows if r.module_type == t and (r.ckpt, r.kind) == (ckpt, kind))
                if not pts:
                    continue
                lab = ckpt if kind == "delta" else ("full FT ΔW" if kind == "full_ft_delta" else "full FT ΔW⊘W0")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=lab)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            if metric == "fro2":
                ax.set_yscale("log")
        axes[0][0].set_ylabel(_TITLES[metric], fontsize=8)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        p = os.path.join(out, f"{metric}.png")
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)
    return paths


# ================================================================================================ demo


def make_demo_checkpoints(out: str, steps: int = 60, r: int = 2, seed: int = 0) -> dict[str, str]:
    """Train LoRA (r) and HiRA (r) adapters and a full fine-tuning run of a small random Llama (CPU, ~seconds).

    Both adapters have r·(d+n) parameters per layer. Data: fixed random token sequences whose next token is a
    fixed function of the current one, so every method has something to learn.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import hira

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    base_dir = os.path.join(out, "base")
    LlamaForCausalLM(cfg).save_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(cfg.vocab_size, generator=g)
    start = torch.randint(0, cfg.vocab_size, (256, 1), generator=g)
    seqs = [start]
    for _ in range(31):
        seqs.append(perm[seqs[-1]])
    data = torch.cat(seqs, 1)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    paths = {"base": base_dir}
    for name, make, lr in (
        ("lora", lambda m: get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)), 1e-2),
        ("hira", lambda m: get_peft_model(m, hira.HiraConfig(r=r, target_modules=targets)), 1e-2),
        ("full_ft", lambda m: m, 1e-3),
    ):
        torch.manual_seed(seed + 2)
        model = make(LlamaForCausalLM.from_pretrained(base_dir))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
        for s in range(steps):
            b = data[(s * 32) % 256 : (s * 32) % 256 + 32]
            loss = model(input_ids=b, labels=b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        p = os.path.join(out, name)
        model.save_pretrained(p)
        paths[name] = p
        paths[name + "_loss"] = loss.item()
    return paths


# ================================================================================================ CLI


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(prog="python -m hira.analysis", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--ckpt", action="append", default=[], help="adapter directory (repeat to overlay several)")
    ap.add_argument("--label", action="append", default=None, help="legend label per --ckpt (default: folder name)")
    ap.add_argument("--full_ft", default=None, help="fully fine-tuned model of the same base (optional)")
    ap.add_argument("--base", default=None, help="base model (default: base_model_name_or_path of the adapter)")
    ap.add_argument("--out", required=True, help="output folder (JSON, CSV, PNG)")
    ap.add_argument("--sv_threshold", type=float, default=0.005, help="singular-value threshold (paper Fig. 4)")
    ap.add_argument("--device", default=None, help="device for the SVDs (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model load dtype")
    ap.add_argument("--demo", action="store_true", help="train small LoRA/HiRA/full-FT runs first and analyse them")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    settings = {"sv_threshold": args.sv_threshold, "num_rank_tol": "sigma_max * max(d, n) * eps_fp32",
                "eff_rank": "Roy & Vetterli, p_i = sigma_i / sum(sigma)", "device": device}
    if args.demo:
        demo = make_demo_checkpoints(os.path.join(args.out, "demo_runs"))
        args.ckpt, args.full_ft = [demo["lora"], demo["hira"]], demo["full_ft"]
        settings["demo_final_loss"] = {k: demo[k + "_loss"] for k in ("lora", "hira", "full_ft")}
    if not args.ckpt:
        ap.error("give at least one --ckpt (or --demo)")
    if args.label and len(args.label) != len(args.ckpt):
        ap.error("give one --label per --ckpt")
    rows, modules, model = [], None, None
    for i, ck in enumerate(args.ckpt):
        if not os.path.isfile(os.path.join(ck, "adapter_config.json")):
            raise SystemExit(f"{ck}: not an adapter directory (no adapter_config.json)")
        rws, mods, mdl = analyze_checkpoint(ck, base=args.base, device=device, sv_threshold=args.sv_threshold,
                                            dtype=dtype, label=args.label[i] if args.label else None,
                                            progress=not args.no_progress)
        rows += rws
        if modules is None:
            modules, model = mods, mdl
        else:
            del mdl
    if args.full_ft:
        rows += analyze_full_ft(args.full_ft, model, modules, device=device, sv_threshold=args.sv_threshold,
                                dtype=dtype, progress=not args.no_progress)
    settings["checkpoints"] = args.ckpt
    settings["full_ft"] = args.full_ft
    write_outputs(rows, args.out, settings)
    summary = {}
    for r in rows:
        summary.setdefault((r.ckpt, r.kind), []).append(r)
    for (ck, kind), rs in summary.items():
        print(f"{ck:>12s} {kind:22s} layers={len(rs):3d}  mean num_rank={sum(x.num_rank for x in rs) / len(rs):7.1f}  "
              f"mean n_above={sum(x.n_above for x in rs) / len(rs):7.1f}  mean eff_rank={sum(x.eff_rank for x in rs) / len(rs):6.1f}"
              f"  r={rs[0].r}")
    print(f"wrote {args.out}/analysis.json, analysis.csv, " + ", ".join(f"{m}.png" for m in METRICS))
    return rows


if __name__ == "__main__":
    main()
