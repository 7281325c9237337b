"""HiRA-SB initialisation: frozen factors from the full-fine-tuning gradient, only the r×r core S trains.

``ΔW = R ⊙ (B·S·A)`` (R = W0 unless another modulator is configured). For each adapted weight the full fine-tuning
gradient ``G = ∂L/∂W`` is estimated on a few batches; the HiRA-space picture is:

* the gradient of the modulation ``M = B·S·A`` is ``R ⊙ G``;
* the update of M that reproduces a full fine-tuning step ``-η·G`` is ``-η·(G ⊘ R)``.

``sb_init`` takes the truncated SVD ``U Σ Vᵀ`` of a target ``T`` and sets ``B = c·U_r``, ``A = c·V_rᵀ``:

* ``sb_target="grad_times_weight"`` (default): ``T = R ⊙ G``, the gradient of M itself;
* ``"grad_over_weight"``: ``T = G ⊘ R``, the full-FT update in M-space; ``"grad"``: ``T = G``.

The default was chosen by the one-step loss measurement in tests/test_variants.py (see docs/variants.md): S starts at
0, so the first steps are gradient steps on S, and the loss falls fastest when span(B)⊗span(A) holds the most of
the gradient of M, ``R ⊙ G``, rather than of the full-FT update ``G ⊘ R``.

Start: ``sb_init_step = 0`` (default) keeps ``S = 0``, so the adapted model starts exactly as the base model
(offset init); ``sb_init_step = η > 0`` applies the projected full-FT step at init (LoRA-SB style),
``S0 = -η·(B⁺ (G⊘R) A⁺)``, i.e. ``M0 = -η·P_U (G⊘R) P_V``.

Scale: ``c² = √(d·n) / (r · rms(R))`` so that one Adam step on S (≈ lr per entry) moves W by about
``lr·√(d·n)`` in Frobenius norm, the size of a full fine-tuning Adam step with the same lr (``scale="full_ft"``,
default); a number gives ``c²`` directly (``1.0``: orthonormal factors).

The division ``G ⊘ R`` is guarded: entries with ``|R| < sb_eps·mean|R|`` are divided by ``±sb_eps·mean|R|`` instead.

Everything runs on the model's device, one layer at a time for the SVD; the gradient estimate needs one fp32
``d×n`` accumulator per adapted layer. Under DeepSpeed ZeRO-3 the base weights are gathered where they are read
(forward/backward of the fused path, the SVD step) and the adapter tensors are written with :func:`hira._zero3.write`
(rank 0 modifies; a trainable tensor's fp32 master in the ZeRO-3 optimizer is updated too); with several processes
the gradient estimates are averaged across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import _zero3
from .layer import HiraFamilyMixin


def _sb_layers(model, adapter_name):
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, HiraFamilyMixin):
            spec = mod.__dict__.get("hira_variant", {}).get(adapter_name)
            if spec is not None and spec.variant == "sb":
                out.append((name, mod))
    return out


def _default_loss(model, batch):
    return model(**batch).loss


def _to_device(batch, device):
    if isinstance(batch, dict):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(v.to(device) if torch.is_tensor(v) else v for v in batch)
    return batch.to(device) if torch.is_tensor(batch) else batch


@torch.no_grad()
def _guarded_div(G, Rm, eps):
    floor = eps * Rm.abs().mean().clamp_min(torch.finfo(torch.float32).tiny)
    sign = torch.where(Rm >= 0, 1.0, -1.0)
    return G / (sign * Rm.abs().clamp_min(floor))


def estimate_full_ft_gradients(
    model,
    batches: Iterable,
    layers,
    *,
    loss_fn: Callable | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Average ``∂L/∂W0`` (out×in, fp32) of each given layer over the batches, without touching any ``.grad``.

    All parameters are frozen meanwhile; a layer input that does not require grad is made a leaf that does, so the
    output gradient ``g`` of every layer is exact while no parameter gradient is computed; ``G += gᵀ·x`` is
    accumulated from a tensor hook on the layer output.
    """
    loss_fn = loss_fn or _default_loss
    device = next(p.device for p in model.parameters())
    acc = {name: None for name, _ in layers}
    handles = []

    def pre_hook(mod, args, kwargs):
        x = args[0]
        if not x.requires_grad:  # make the graph reach this layer's output; keep links from earlier layers
            x = x.detach().requires_grad_(True)
        return (x, *args[1:]), kwargs

    def make_post(name):
        def post(mod, args, out):
            if not (torch.is_tensor(out) and out.requires_grad):
                return
            x = args[0].detach()

            def grad_hook(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).float()
                G = g2.t() @ x.reshape(-1, x.shape[-1]).float()
                acc[name] = G if acc[name] is None else acc[name].add_(G)

            out.register_hook(grad_hook)

        return post

    for name, mod in layers:
        handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(mod.register_forward_hook(make_post(name)))
    req = {p: p.requires_grad for p in model.parameters()}
    gc_model = next((m for m in model.modules() if getattr(m, "is_gradient_checkpointing", False)), None)
    if gc_model is not None:
        gc_model.gradient_checkpointing_disable()  # reentrant checkpointing would see no input needing grad
    n = 0
    try:
        for p in req:
            p.requires_grad_(False)
        it = batches if num_batches is None else (b for i, b in zip(range(num_batches), batches))
        total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
        for batch in tqdm(it, total=total, desc="HiRA-SB: full-FT gradient", disable=not progress):
            with torch.enable_grad():
                loss = loss_fn(model, _to_device(batch, device))
                loss.backward()
            n += 1
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        if gc_model is not None:
            gc_model.gradient_checkpointing_enable()
    if n == 0:
        raise ValueError("HiRA-SB init got no batches: pass a dataloader or a list of batches.")
    missing = [k for k, v in acc.items() if v is None]
    if missing:
        raise RuntimeError(f"No gradient reached these HiRA-SB layers (are they used by the loss?): {missing[:5]}")
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        for G in acc.values():
            torch.distributed.all_reduce(G)
    return {k: v / (n * world) for k, v in acc.items()}


def sb_init(
    model,
    batches: Iterable,
    *,
    adapter_name: str = "default",
    target: str | None = None,
    init_step: float | None = None,
    eps: float | None = None,
    scale: str | float = "full_ft",
    loss_fn: Callable | None = None,
    num_batches: int | None = 8,
    progress: bool = True,
) -> dict[str, dict]:
    """Initialise every HiRA-SB layer of ``model`` (a ``PeftModel``) from the full-fine-tuning gradient.

    Args:
        model: the PEFT model with a ``variant="sb"`` adapter ``adapter_name``.
        batches: a DataLoader or iterable of batches; by default each batch is ``model(**batch).loss``-ready
            (``input_ids``, ``attention_mask``, ``labels``); otherwise pass ``loss_fn(model, batch) -> loss``.
        target, init_step, eps: override the config's ``sb_target``, ``sb_init_step``, ``sb_eps``.
        scale: ``"full_ft"`` (c² = √(dn)/(r·rms(R))) or a float c²; see the module docstring.
        num_batches: how many batches to average (``None``: all).
        progress: show tqdm progress bars (gradient batches, then layers).

    Returns:
        per layer: ``{"energy": share of ‖T‖²_F in the top-r singular values, "scale": c²}``.
    """
    from .variants import SB_TARGETS

    config = model.peft_config[adapter_name]
    target = target or config.sb_target
    init_step = config.sb_init_step if init_step is None else init_step
    eps = config.sb_eps if eps is None else eps
    if target not in SB_TARGETS:
        raise ValueError(f"target must be one of {list(SB_TARGETS)}, got {target!r}.")
    layers = _sb_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no HiRA-SB layers (variant='sb').")
    was_training = model.training
    grads = estimate_full_ft_gradients(
        model, batches, layers, loss_fn=loss_fn, num_batches=num_batches, progress=progress
    )
    model.train(was_training)
    _zero3.release(model.parameters())  # left gathered by the gradient pass (outside the engine's hooks)
    report = {}
    for name, layer in tqdm(layers, desc="HiRA-SB: SVD init", disable=not progress):
        G = grads.pop(name)
        spec = layer.hira_variant[adapter_name]
        r = spec.r
        with _zero3.gather([layer.get_base_layer().weight], site="read"):
            W0 = layer._original_weight_oi().detach().float().to(G.device).clone()
        term = layer._adapter_term(adapter_name, None)
        Rm = W0 if term.modulator is None else term.modulator().float().to(G.device)
        del W0
        T_full = _guarded_div(G, Rm, eps)  # the full-FT update direction in M-space
        T = {"grad_over_weight": T_full, "grad": G, "grad_times_weight": Rm * G}[target]
        U, S, Vh = torch.linalg.svd(T, full_matrices=False)
        U, Vh = U[:, :r], Vh[:r]
        d, n = G.shape
        if scale == "full_ft":
            c2 = math.sqrt(d * n) / (r * Rm.pow(2).mean().sqrt().clamp_min(1e-12).item())
        else:
            c2 = float(scale)
        c = math.sqrt(c2)
        Bn, An = U * c, Vh * c
        if init_step > 0:  # S0 with B·S0·A = -η·P_U (G⊘R) P_V
            S0 = -init_step * (U.t() @ T_full @ Vh.t()) / c2
        else:
            S0 = torch.zeros(r, r, device=G.device)
        energy = (S[:r].pow(2).sum() / S.pow(2).sum().clamp_min(1e-30)).item()
        params = [layer.hira_A[adapter_name], layer.hira_B[adapter_name], layer.hira_R[adapter_name]]
        _zero3.write(params, [An, Bn, S0])
        report[name] = {"energy": energy, "scale": c2}
        del G, T, T_full, Rm, U, S, Vh
    return report
