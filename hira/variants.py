"""The HiRA family beyond plain HiRA: HiLoRA, BHRA, HiRA-SB and alternative modulators.

Every variant is a configuration of the same registered tuner (``hira.HiraConfig(variant=..., modulator=...)``) and
plugs into the layer hooks of :class:`hira.layer.HiraFamilyMixin`: a non-plain adapter gets an :class:`AdapterVariant`
in ``layer.hira_variant[adapter]`` that supplies the adapter's :class:`~hira.functional.Term` (factorization, params,
modulator), its additive non-Hadamard output, and its dense ``ΔW`` for merging and analysis. The Hadamard part always
runs through the fused autograd Function of :mod:`hira.functional` (no dense d×k tensor is saved for backward).

Variants (``W' = W0 + ΔW``; W0 is out×in = d×n, ``R`` the modulator, ``W0`` by default):

* ``hira``: ``ΔW = R ⊙ (B·A)``, B d×r, A r×n.
* ``hilora``: ``ΔW = R ⊙ (B1·A1) + s·B2·A2`` with ``r1 + r2 = r`` (``r2 = hilora_r2``); ``s = hilora_alpha / r2`` when
  ``hilora_alpha`` is set (LoRA's convention), else ``s = 1`` (no scaling, like HiRA's own part). ``r2 = 0`` is
  exactly HiRA, ``r1 = 0`` exactly LoRA with ``lora_alpha = hilora_alpha`` (or ``lora_alpha = r2`` when unset).
* ``bhra``: W0 is cut into a k×k grid of (d/k)×(n/k) blocks; block (i, j) gets ``R_ij ⊙ (B_ij·A_ij)`` with its own
  rank-(r/k) factors. Parameters ``k²·(r/k)·(d/k + n/k) = r·(d+n)``, those of rank-r LoRA/HiRA; ``k = 1`` is HiRA.
* ``sb`` (HiRA-SB): ``ΔW = R ⊙ (B·S·A)`` with B, A frozen and only the r×r matrix S trained (stored as ``hira_R``);
  B, A come from :func:`hira.sb.sb_init` (truncated SVD of a full-fine-tuning gradient estimate).

Modulators (the fixed R):

* ``weight``: W0 (the paper's HiRA). Nothing stored.
* ``random``: uniform [0, 1) from a counter-based integer hash of (seed, element index), regenerated on the fly in
  forward and backward with integer arithmetic, so it is bit-identical on every device and nothing is stored or kept
  in memory. All adapted layers of one shape share the same matrix (like VeRA's shared random projections).
* ``lowrank``: the rank-v truncated SVD of W0 (``modulator_rank = v``), stored in the checkpoint as two factors
  (v·(d+n) numbers per layer): SVDs are not bit-reproducible across devices, so storing them keeps load/merge exact.
* ``smooth``: the element-wise mean of the same module's base weight in the layer below, this layer and the layer
  above (two at the ends of the stack). Recomputed from the base model when the adapter is created or loaded
  (element-wise IEEE arithmetic, identical on every device): nothing on disk, one d×n buffer per layer in memory.

Every variant merges (``W0 + ΔW``, computed in fp32) and unmerges exactly (the tuner restores a stored copy of W0).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _zero3
from ._peft_compat import BufferDict, move_adapter_to_base_device, set_frozen_factors
from .functional import LOW_RANK, Factorization, Term, compute_dtype, output_dtype


VARIANTS = ("hira", "hilora", "bhra", "sb")
MODULATORS = ("weight", "random", "lowrank", "smooth")
SB_TARGETS = ("grad_over_weight", "grad", "grad_times_weight")

# Per-adapter containers the variants add to every HiRA-family layer (registered in layer.py's class attributes).
VARIANT_ADAPTER_LAYER_NAMES = ("hira_lora_A", "hira_lora_B", "hira_R")  # trainable
VARIANT_OTHER_NAMES = ("hira_mod_U", "hira_mod_V", "hira_mod_S", "hira_variant")  # buffers / per-adapter spec


# ================================================================================================ factorizations


class BlockLowRank(Factorization):
    """BHRA: ``M`` is a k×k grid of blocks ``B[i, j] @ A[i, j]``; params ``(A, B)``, A (k, k, r/k, n/k), B (k, k, d/k, r/k)."""

    def dense(self, A, B):
        k, _, db, _ = B.shape
        nb = A.shape[-1]
        return torch.einsum("ijdr,ijrn->idjn", B, A).reshape(k * db, k * nb)

    def backward(self, grad_M, A, B):
        k, _, db, _ = B.shape
        nb = A.shape[-1]
        g4 = grad_M.reshape(k, db, k, nb)
        gA = torch.einsum("ijdr,idjn->ijrn", B, g4) if A.requires_grad else None
        gB = torch.einsum("idjn,ijrn->ijdr", g4, A) if B.requires_grad else None
        return gA, gB


class SandwichLowRank(Factorization):
    """HiRA-SB: ``M = B·S·A``; params ``(A, B, S)``, A r×n, B d×r, S r×r (usually only S trains)."""

    def dense(self, A, B, S):
        return (B @ S) @ A

    def backward(self, grad_M, A, B, S):
        gS = (B.t() @ grad_M) @ A.t() if S.requires_grad else None
        gA = (B @ S).t() @ grad_M if A.requires_grad else None
        gB = grad_M @ (S @ A).t() if B.requires_grad else None
        return gA, gB, gS


BLOCK_LOW_RANK = BlockLowRank()
SANDWICH = SandwichLowRank()


# ================================================================================================ modulators

_M32 = 0xFFFFFFFF


def hash_uniform(shape: tuple[int, ...], seed: int, device=None) -> torch.Tensor:
    """Uniform [0, 1) float32 from a counter-based integer hash of (seed, index): identical on every device.

    The 32-bit ``lowbias32`` mixer (xor-shift-multiply) runs in int64 with explicit 32-bit masks, so the result does
    not depend on the device's random number generator. 24 bits per value (exact in float32).
    """
    n = math.prod(shape)
    x = torch.arange(n, dtype=torch.int64, device=device)
    s = ((int(seed) * 0x9E3779B1) ^ 0x85EBCA6B) & _M32
    x = (x * 0x9E3779B1 + s) & _M32
    for mult in (0x7FEB352D, 0x846CA68B):
        x = x ^ (x >> 16)
        x = (x * mult) & _M32
    x = x ^ (x >> 16)
    return ((x >> 8).to(torch.float32) * (1.0 / (1 << 24))).reshape(shape)


def _randomized_svd(W: torch.Tensor, rank: int, seed: int = 0, oversample: int = 10, n_iter: int = 4):
    """Top-``rank`` SVD of W (fp32 or fp64): exact below 257 rows/columns, else a seeded randomized range finder
    with power iterations (does not touch the global RNG)."""
    d, n = W.shape
    q = min(rank + oversample, d, n)
    if q >= min(d, n) or min(d, n) <= 256:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Om = torch.randn(n, q, generator=gen).to(device=W.device, dtype=W.dtype)
    Y = W @ Om
    for _ in range(n_iter):
        Y, _ = torch.linalg.qr(Y)
        Y, _ = torch.linalg.qr(W.t() @ Y)
        Y = W @ Y
    Q, _ = torch.linalg.qr(Y)
    Ub, S, Vh = torch.linalg.svd(Q.t() @ W, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


# ================================================================================================ HiLoRA's LoRA part


class _LoraFn(torch.autograd.Function):
    """``s·(x·A2ᵀ)·B2ᵀ``; re-gathers ZeRO-3 partitioned factors in backward (like the fused HiRA Function)."""

    @staticmethod
    def forward(ctx, x, A, B, scaling, gather):
        cdt = compute_dtype(x, (A, B))
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(x.to(cdt), A.to(cdt))
            y = F.linear(h, B.to(cdt)) * scaling
        ctx.save_for_backward(x, A, B)
        ctx.scaling, ctx.gather, ctx.cdt = scaling, gather, cdt
        return y.to(output_dtype(x, cdt))

    @staticmethod
    def backward(ctx, g):
        x, A, B = ctx.saved_tensors
        gather = ctx.gather() if ctx.gather is not None else contextlib.nullcontext()
        with gather, torch.autocast(g.device.type, enabled=False):
            cdt, s = ctx.cdt, ctx.scaling
            g2 = g.to(cdt).reshape(-1, g.shape[-1])
            x2 = x.to(cdt).reshape(-1, x.shape[-1])
            gh = (g2 @ B.to(cdt)) * s  # (N, r2)
            gx = (gh @ A.to(cdt)).reshape(*x.shape[:-1], A.shape[1]).to(x.dtype) if ctx.needs_input_grad[0] else None
            gA = (gh.t() @ x2).to(A.dtype) if ctx.needs_input_grad[1] else None
            gB = ((g2.t() @ (x2 @ A.to(cdt).t())) * s).to(B.dtype) if ctx.needs_input_grad[2] else None
        return gx, gA, gB, None, None


# ================================================================================================ per-adapter spec


@dataclass
class AdapterVariant:
    """What makes one adapter of one layer a non-plain HiRA-family member (rebuilt from the config on load)."""

    variant: str
    modulator: str
    r: int
    r2: int = 0  # HiLoRA: LoRA rank
    scaling: float = 1.0  # HiLoRA: LoRA-part scale
    blocks: int = 1  # BHRA grid size k
    seed: int = 0  # random modulator

    # -------------------------------------------------- hooks called from HiraFamilyMixin
    def factorization(self):
        return {"bhra": BLOCK_LOW_RANK, "sb": SANDWICH}.get(self.variant, LOW_RANK)

    def term_params(self, layer, adapter):
        p = (layer.hira_A[adapter], layer.hira_B[adapter])
        return p + (layer.hira_R[adapter],) if self.variant == "sb" else p

    def factor_params(self, layer, adapter):
        p = self.term_params(layer, adapter)
        if self.variant == "hilora":
            p = p + (layer.hira_lora_A[adapter], layer.hira_lora_B[adapter])
        return p

    def modulator_fn(self, layer, adapter):
        if self.modulator == "weight":
            return None
        if self.modulator == "random":
            W = layer.get_base_layer().weight
            shape, device, seed = (layer.out_features, layer.in_features), W.device, self.seed
            return lambda: hash_uniform(shape, seed, device)
        if self.modulator == "lowrank":
            U, V = layer.hira_mod_U[adapter], layer.hira_mod_V[adapter]
            return lambda: U @ V
        if self.modulator == "smooth":
            if adapter not in layer.hira_mod_S:
                raise RuntimeError(
                    "The smooth modulator is computed from neighbouring layers when the adapter is injected; this "
                    "layer has none (was the adapter added with HiraModel / get_peft_model?)."
                )
            S = layer.hira_mod_S[adapter]
            return lambda: S
        raise ValueError(self.modulator)

    def adapter_term(self, layer, adapter, x_in) -> Term:
        return Term(
            x_in=x_in,
            factorization=self.factorization(),
            params=self.term_params(layer, adapter),
            modulator=self.modulator_fn(layer, adapter),
        )

    def extra_output(self, layer, adapter, x_in):
        if self.variant != "hilora" or self.r2 == 0:
            return None
        A2, B2 = layer.hira_lora_A[adapter], layer.hira_lora_B[adapter]
        zero3 = _zero3.any_partitioned((A2, B2))
        gather = (lambda: _zero3.gather([A2, B2], site="backward")) if zero3 else None
        with _zero3.gather([A2, B2], site="forward"):
            return _LoraFn.apply(x_in, A2, B2, self.scaling, gather)

    def additive_delta(self, layer, adapter, W0, dtype):
        """``W' - W0`` (out, in) in ``dtype``; ``W0`` is the original weight in that layout."""
        term = self.adapter_term(layer, adapter, None)
        M = term.factorization.dense(*[p.to(dtype) for p in term.params])
        R = W0 if term.modulator is None else term.modulator()
        delta = R.to(dtype) * M
        if self.variant == "hilora" and self.r2 > 0:
            delta = delta + self.scaling * (layer.hira_lora_B[adapter].to(dtype) @ layer.hira_lora_A[adapter].to(dtype))
        return delta


# ================================================================================================ config validation


def validate_config(cfg) -> None:
    """Checks of the variant fields of a :class:`hira.HiraConfig` (called from its ``__post_init__``)."""
    v, mod = cfg.variant, cfg.modulator
    if v not in VARIANTS:
        raise ValueError(f"Unknown HiRA variant {v!r}; choose one of {list(VARIANTS)}.")
    if mod not in MODULATORS:
        raise ValueError(f"Unknown modulator {mod!r}; choose one of {list(MODULATORS)}.")
    ranks = [cfg.r, *(cfg.rank_pattern or {}).values()]

    def only(field, variant_ok, default, what):
        if getattr(cfg, field) != default and not variant_ok:
            raise ValueError(f"{field}={getattr(cfg, field)!r} only applies to {what}; got variant={v!r}, modulator={mod!r}.")

    only("hilora_r2", v == "hilora", 0, "variant='hilora'")
    only("hilora_alpha", v == "hilora", None, "variant='hilora'")
    only("bhra_blocks", v == "bhra", 1, "variant='bhra'")
    only("sb_target", v == "sb", SB_DEFAULTS["sb_target"], "variant='sb'")
    only("sb_init_step", v == "sb", SB_DEFAULTS["sb_init_step"], "variant='sb'")
    only("sb_eps", v == "sb", SB_DEFAULTS["sb_eps"], "variant='sb'")
    only("modulator_seed", mod == "random", 0, "modulator='random'")
    only("modulator_rank", mod == "lowrank", 8, "modulator='lowrank'")

    if v == "hilora":
        r2 = cfg.hilora_r2
        if not isinstance(r2, int) or r2 < 0 or any(r2 > r for r in ranks):
            raise ValueError(
                f"HiLoRA needs 0 <= hilora_r2 <= r (r1 = r - r2 is the Hadamard rank); got hilora_r2={r2!r}, r={cfg.r}"
                f"{', rank_pattern=' + str(cfg.rank_pattern) if cfg.rank_pattern else ''}."
            )
        if cfg.hilora_alpha is not None and not cfg.hilora_alpha > 0:
            raise ValueError(f"hilora_alpha must be positive (or None for scale 1), got {cfg.hilora_alpha!r}.")
    if v == "bhra":
        k = cfg.bhra_blocks
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"bhra_blocks (the k of a k×k grid) must be a positive integer, got {k!r}.")
        bad = [r for r in ranks if r % k]
        if bad:
            raise ValueError(
                f"BHRA with a {k}×{k} grid gives each block rank r/k: r must be divisible by bhra_blocks={k}, "
                f"got r={bad[0]}. Use e.g. r={k * max(1, bad[0] // k)}."
            )
    if v == "sb":
        if cfg.sb_target not in SB_TARGETS:
            raise ValueError(f"sb_target must be one of {list(SB_TARGETS)}, got {cfg.sb_target!r}.")
        if not cfg.sb_init_step >= 0:
            raise ValueError(f"sb_init_step must be >= 0 (0: no-op start), got {cfg.sb_init_step!r}.")
        if not cfg.sb_eps > 0:
            raise ValueError(f"sb_eps must be > 0, got {cfg.sb_eps!r}.")
    if mod == "lowrank" and (not isinstance(cfg.modulator_rank, int) or cfg.modulator_rank < 1):
        raise ValueError(f"modulator_rank must be a positive integer, got {cfg.modulator_rank!r}.")


# Defaults of HiRA-SB's init options (config.py reads them; see hira/sb.py and docs/variants.md for the choice).
SB_DEFAULTS = {"sb_target": "grad_times_weight", "sb_init_step": 0.0, "sb_eps": 0.05}


def variant_fields_default(cfg) -> bool:
    return (
        cfg.hilora_r2 == 0
        and cfg.hilora_alpha is None
        and cfg.bhra_blocks == 1
        and cfg.modulator_seed == 0
        and cfg.modulator_rank == 8
        and all(getattr(cfg, k) == v for k, v in SB_DEFAULTS.items())
    )


# ================================================================================================ layer setup


def ensure_containers(layer) -> None:
    """Create the variants' per-adapter containers on a layer (idempotent; before stock update_layer runs)."""
    for name in VARIANT_ADAPTER_LAYER_NAMES:
        if name not in layer._modules:
            setattr(layer, name, nn.ParameterDict({}))
    for name, persistent in (("hira_mod_U", True), ("hira_mod_V", True), ("hira_mod_S", False)):
        if name not in layer._modules:
            setattr(layer, name, BufferDict({}, persistent=persistent))
    if "hira_variant" not in layer.__dict__:
        layer.hira_variant = {}


def _drop(layer, adapter):
    for name in VARIANT_ADAPTER_LAYER_NAMES + VARIANT_OTHER_NAMES:
        c = getattr(layer, name)
        if adapter in c:
            del c[adapter]
    set_frozen_factors(layer, adapter, ())


def setup_adapter(layer, adapter: str, r: int, config) -> None:
    """Turn the freshly created plain-HiRA adapter ``adapter`` of ``layer`` into the configured variant."""
    _drop(layer, adapter)
    variant = getattr(config, "variant", "hira")
    modulator = getattr(config, "modulator", "weight")
    if variant == "hira" and modulator == "weight":
        return
    from transformers.pytorch_utils import Conv1D

    base = layer.get_base_layer()
    if not isinstance(base, (nn.Linear, Conv1D)):
        raise ValueError(
            f"HiRA variant={variant!r} / modulator={modulator!r} supports linear layers (nn.Linear, transformers "
            f"Conv1D, bitsandbytes Linear8bitLt/Linear4bit); got {type(base).__name__}. Use plain HiRA for it or "
            "exclude it (exclude_modules)."
        )
    d, n = layer.out_features, layer.in_features
    A, B = layer.hira_A[adapter], layer.hira_B[adapter]
    dev = A.device
    init = config.init_weights
    spec = AdapterVariant(variant=variant, modulator=modulator, r=r)

    if variant == "hilora":
        r2 = config.hilora_r2
        if r2 > r:
            raise ValueError(f"hilora_r2={r2} exceeds this layer's rank r={r} (rank_pattern?).")
        r1 = r - r2
        spec.r2 = r2
        spec.scaling = (config.hilora_alpha / r2) if (config.hilora_alpha is not None and r2 > 0) else 1.0
        layer.hira_A[adapter] = nn.Parameter(A.data[:r1].clone())
        layer.hira_B[adapter] = nn.Parameter(B.data[:, :r1].clone())
        A2 = torch.empty(r2, n, device=dev)
        B2 = torch.empty(d, r2, device=dev)
        if init is False:
            nn.init.normal_(A2), nn.init.normal_(B2)
        else:
            if r2 > 0:
                nn.init.kaiming_uniform_(A2, a=math.sqrt(5))  # LoRA's init; B2 = 0 keeps the no-op start
            nn.init.zeros_(B2)
        layer.hira_lora_A[adapter] = nn.Parameter(A2)
        layer.hira_lora_B[adapter] = nn.Parameter(B2)
    elif variant == "bhra":
        k = config.bhra_blocks
        if d % k or n % k or r % k:
            raise ValueError(
                f"BHRA grid {k}×{k} does not divide this layer: weight {d}×{n} (out×in) and rank r={r} must all be "
                f"divisible by bhra_blocks={k}."
            )
        rb, db, nb = r // k, d // k, n // k
        A4 = torch.empty(k, k, rb, nb, device=dev)
        B4 = torch.empty(k, k, db, rb, device=dev)
        if init is False:
            nn.init.normal_(A4), nn.init.normal_(B4)
        else:
            if init == "gaussian":
                nn.init.normal_(A4, std=1 / rb)
            else:  # kaiming_uniform(a=√5) per block, as HiRA/LoRA do for the full A: bound 1/√fan_in
                nn.init.uniform_(A4, -1 / math.sqrt(nb), 1 / math.sqrt(nb))
            nn.init.zeros_(B4)
        layer.hira_A[adapter] = nn.Parameter(A4)
        layer.hira_B[adapter] = nn.Parameter(B4)
    elif variant == "sb":
        # Before hira.sb_init: random orthonormal frozen factors (a random subspace) and S = 0 (no-op start).
        gen = torch.Generator(device="cpu").manual_seed(0x5B + r)
        Bq, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
        Aq, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
        layer.hira_A[adapter] = nn.Parameter(Aq.t().contiguous().to(dev), requires_grad=False)
        layer.hira_B[adapter] = nn.Parameter(Bq.contiguous().to(dev), requires_grad=False)
        layer.hira_R[adapter] = nn.Parameter(torch.zeros(r, r, device=dev))
        set_frozen_factors(layer, adapter, ("hira_A", "hira_B"))

    if modulator == "random":
        spec.seed = int(config.modulator_seed)
    elif modulator == "lowrank":
        v = config.modulator_rank
        if v > min(d, n):
            raise ValueError(f"modulator_rank={v} exceeds min(out, in)={min(d, n)} of this layer.")
        with _zero3.gather([base.weight], site="read"):
            W0 = layer._original_weight_oi().detach()
            U, S, Vh = _randomized_svd(W0.to(torch.promote_types(torch.float32, W0.dtype)), v)
        modulator_factors = ((U * S).contiguous(), Vh.contiguous())
    # "smooth" is filled by finalize_adapter() once every layer of the model is known.

    layer.hira_variant[adapter] = spec
    move_adapter_to_base_device(layer, adapter)  # the factors: base layer's device and dtype, as PEFT's own
    if modulator == "lowrank":  # the fixed modulator keeps its precision (>= fp32) on a half-precision model
        dev = base.weight.device
        layer.hira_mod_U[adapter], layer.hira_mod_V[adapter] = (t.to(dev) for t in modulator_factors)


def set_smooth_modulator(layer, adapter: str, neighbours: list[torch.Tensor]) -> None:
    """The ``smooth`` modulator of ``layer``: the element-wise mean of ``neighbours`` (out×in weights of the same
    module in the layers below, at and above, this layer's own included)."""
    dt = torch.promote_types(torch.float32, neighbours[0].dtype)
    S = neighbours[0].to(dt).clone()
    for w in neighbours[1:]:
        S = S + w.to(device=S.device, dtype=dt)
    layer.hira_mod_S[adapter] = (S / len(neighbours)).to(layer.get_base_layer().weight.device)
