"""The fused HiRA linear: ``y = x·(W0 + R ⊙ M)ᵀ + b`` as one autograd Function that saves no d×k tensor.

Notation: ``W0`` is the frozen base weight (out×in), ``M`` the dense modulation built from small factors (plain HiRA:
``M = B·A``), ``R`` the fixed modulator (plain HiRA: ``R = W0``). Stock PEFT computes ``base(x) + x·(W0⊙BA)ᵀ``: two
full-size GEMMs forward, three backward, and autograd keeps the dense ``W0⊙BA`` alive until backward. Here:

* forward, one GEMM on ``W_eff = W0 + R⊙M`` (two GEMMs in half precision under the ``"split"`` policy, below);
* backward, ``grad_x = g·W_eff`` (one GEMM, ``W_eff`` recomputed), ``G = gᵀ·x`` (the weight-gradient GEMM every exact
  HiRA needs), ``dL/dM = R ⊙ G``, then the factorization maps ``dL/dM`` to its factors (plain: ``grad_B = dM·Aᵀ``,
  ``grad_A = Bᵀ·dM``);
* only ``x`` (and, with dropout, ``dropout(x)``) plus the parameters are saved for backward; ``W_eff`` and ``G`` are
  transient.

Half-precision policy (bf16/fp16 compute, e.g. under autocast):

* ``"merged"`` (default): one GEMM on ``W_eff`` rounded to half precision, i.e. the precision a merged
  half-precision model has at inference, and the HiRA authors' own implementation (``F.linear(x, W0 ⊙ (1 + BA))``).
  Entries of ``M`` below the half-precision resolution of ``1 + M`` (≈2⁻⁹ for bf16) are invisible in the forward.
  3 GEMMs.
* ``"split"``: the forward keeps the update at half-precision *relative* resolution, exactly like stock PEFT, by
  computing ``x·W0ᵀ + x·(R⊙M)ᵀ`` (two GEMMs); the backward stays one GEMM for ``grad_x``. 4 GEMMs instead of PEFT's
  5, no saved d×k.

Dropout on the adapter input is exact: terms whose input is ``dropout(x)`` rather than ``x`` get their own delta
GEMM (``dropout(x)·(R⊙M)ᵀ``), while the base GEMM sees ``x``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Factorization:
    """Maps factor tensors to the dense modulation ``M`` (out×in) and back-propagates ``dL/dM`` to them.

    Subclasses implement ``dense(*params)`` and ``backward(grad_M, *params)`` (one gradient or ``None`` per param).
    Gradients must not depend on ``M`` itself, so nothing dense is saved between forward and backward.
    """

    def dense(self, *params: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, grad_M: torch.Tensor, *params: torch.Tensor) -> tuple:  # pragma: no cover - interface
        raise NotImplementedError


class LowRank(Factorization):
    """Plain HiRA: ``M = B·A`` with params ``(A, B)``, A r×in, B out×r."""

    def dense(self, A, B):
        return B @ A

    def backward(self, grad_M, A, B):
        gA = B.t() @ grad_M if A.requires_grad else None
        gB = grad_M @ A.t() if B.requires_grad else None
        return gA, gB


LOW_RANK = LowRank()


@dataclass
class Term:
    """One adapter contribution ``x_in·(R⊙M)ᵀ``.

    ``x_in`` is the layer input or a dropped-out copy; ``modulator`` is ``None`` (R = W0) or a zero-argument callable
    returning R (out×in), called again in backward instead of saving a dense tensor (bitsandbytes dequantisation,
    a regenerated random modulator, ...).
    """

    x_in: torch.Tensor
    factorization: Factorization
    params: Sequence[torch.Tensor]
    modulator: Callable[[], torch.Tensor] | None = None


@dataclass
class _Spec:
    n_terms: int
    factorizations: list
    n_params: list
    modulators: list
    same_input: list  # term input is the layer input x (no dropout)
    include_base: bool
    fan_in_fan_out: bool
    compute_dtype: torch.dtype
    half_mode: str
    device_type: str
    gather: Callable | None = None  # context-manager factory re-gathering ZeRO-3 partitioned params in backward


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _work_params(params, wd):
    """Factor params in the dtype of the d×k work: the half compute dtype, or their own (fp32/fp64) dtype.

    Casts keep ``requires_grad`` (factorizations use it to skip the gradients of frozen factors)."""
    if wd is None:
        return tuple(params)
    return tuple(p if p.dtype == wd else p.detach().to(wd).requires_grad_(p.requires_grad) for p in params)


def _dense_M(spec: _Spec, idx: list[int], params_by_term: list, wd) -> torch.Tensor | None:
    M = None
    for t in idx:
        m = spec.factorizations[t].dense(*_work_params(params_by_term[t], wd))
        M = m if M is None else M.add_(m)
    return M


def _modulator(spec: _Spec, t: int, W: torch.Tensor) -> torch.Tensor:
    mod = spec.modulators[t]
    return W if mod is None else mod()


def _unpack(spec: _Spec, flat):
    terms_x, terms_p, pos = [], [], 0
    for t in range(spec.n_terms):
        terms_x.append(flat[pos])
        terms_p.append(tuple(flat[pos + 1 : pos + 1 + spec.n_params[t]]))
        pos += 1 + spec.n_params[t]
    return terms_x, terms_p


def _like_weight(M, spec):
    """Give M the memory layout of the stored weight, so the GEMM on W_eff runs the same kernel as the base layer's
    (bitwise no-op at init). Only transformers ``Conv1D`` (stored in×out) needs the copy."""
    return M.t().contiguous().t() if spec.fan_in_fan_out else M


def _bias(bias, cdt):
    return None if bias is None else bias.to(cdt)


# The d×k work (M, W_eff, W0 ⊙ G) runs in the half compute dtype under bf16/fp16 (as stock PEFT does under autocast:
# half the memory traffic of fp32 and no fp32 d×k transients), and in the adapters' own dtype otherwise. Elementwise
# steps are done in place so that at most two d×k buffers exist at any time.


class _HiraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, x, weight, bias, *flat):
        terms_x, terms_p = _unpack(spec, flat)
        cdt = spec.compute_dtype
        wd = cdt if _is_half(cdt) else None
        with torch.autocast(spec.device_type, enabled=False):
            W = None if weight is None else (weight.t() if spec.fan_in_fan_out else weight)
            # Terms sharing the layer input whose modulator is W0 are folded into one W_eff.
            fold = [t for t in range(spec.n_terms) if spec.same_input[t] and spec.modulators[t] is None]
            if not spec.include_base:
                fold = []
            rest = [t for t in range(spec.n_terms) if t not in fold]
            xs = x.to(cdt)
            y = None
            if spec.include_base:
                M = _dense_M(spec, fold, terms_p, wd)
                if M is None:
                    y = F.linear(xs, W.to(cdt), _bias(bias, cdt))
                elif _is_half(cdt) and spec.half_mode == "split":
                    Wc = W.to(cdt)
                    y = F.linear(xs, Wc, _bias(bias, cdt))
                    y = y + F.linear(xs, M.mul_(Wc))  # W0 ⊙ M at half-precision relative resolution
                else:
                    Wm = W.to(M.dtype)
                    M = _like_weight(M, spec)
                    W_eff = torch.addcmul(Wm, Wm, M, out=M).to(cdt)  # W0 + W0 ⊙ M, in place
                    del M
                    y = F.linear(xs, W_eff, _bias(bias, cdt))
                    del W_eff
            for t in rest:
                M = spec.factorizations[t].dense(*_work_params(terms_p[t], wd))
                R = _modulator(spec, t, W)
                delta = M.mul_(R.to(M.dtype)).to(cdt)
                del M
                out = F.linear(terms_x[t].to(cdt), delta)
                del delta
                y = out if y is None else y + out
        ctx.spec = spec
        ctx.fold = fold
        ctx.rest = rest
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, *flat)
        return y

    @staticmethod
    def backward(ctx, g):
        spec: _Spec = ctx.spec
        if spec.gather is None:
            return _HiraLinearFn._backward(ctx, g, ctx.saved_tensors)
        # DeepSpeed ZeRO-3 released the partitioned params after forward: gather them again before reading them.
        with spec.gather():
            return _HiraLinearFn._backward(ctx, g, ctx.saved_tensors)

    @staticmethod
    def _backward(ctx, g, saved):
        spec: _Spec = ctx.spec
        x, weight, bias, *flat = saved
        terms_x, terms_p = _unpack(spec, flat)
        cdt = spec.compute_dtype
        wd = cdt if _is_half(cdt) else None
        needs = ctx.needs_input_grad  # (spec, x, weight, bias, *flat)
        if needs[2]:
            raise RuntimeError(
                "The fused HiRA path needs a frozen base weight (requires_grad=False); "
                "set `fused=False` in the HiRA config to train the base weight too."
            )

        def params_need(t):
            base = _param_offset(spec, t)
            return any(needs[4 + base + 1 + j] for j in range(spec.n_params[t]))

        grad_x = grad_bias = None
        grads_flat: list = [None] * len(flat)
        with torch.autocast(spec.device_type, enabled=False):
            W = None if weight is None else (weight.t() if spec.fan_in_fan_out else weight)
            gc = g.to(cdt)
            g2 = gc.reshape(-1, gc.shape[-1])
            if spec.include_base:
                # grad_x = g · W_eff: one GEMM on the recomputed W_eff (also in "split" mode).
                if needs[1]:
                    M = _dense_M(spec, ctx.fold, terms_p, wd)
                    if M is None:
                        W_eff = W.to(cdt)
                    else:
                        Wm = W.to(M.dtype)
                        M = _like_weight(M, spec)
                        W_eff = torch.addcmul(Wm, Wm, M, out=M).to(cdt)
                        del M
                    grad_x = (g2 @ W_eff).reshape(*g.shape[:-1], W_eff.shape[1])
                    del W_eff
                if any(params_need(t) for t in ctx.fold):
                    G = g2.t() @ x.to(cdt).reshape(-1, x.shape[-1])  # (out, in): the weight-gradient GEMM
                    gM = G.mul_(W.to(G.dtype)) if wd is not None else G.to(terms_p[ctx.fold[0]][0].dtype).mul_(W)
                    del G
                    for t in ctx.fold:
                        _scatter_grads(spec, t, gM, _work_params(terms_p[t], wd), terms_p[t], grads_flat, needs)
                    del gM
                if ctx.has_bias and needs[3]:
                    grad_bias = g2.sum(0).to(bias.dtype)
            # Separate terms (dropout input or custom modulator).
            for t in ctx.rest:
                base = _param_offset(spec, t)
                R = _modulator(spec, t, W)
                xin = terms_x[t]
                if needs[4 + base]:
                    M = spec.factorizations[t].dense(*_work_params(terms_p[t], wd))
                    delta = M.mul_(R.to(M.dtype)).to(cdt)
                    del M
                    gx_t = (g2 @ delta).reshape(*g.shape[:-1], delta.shape[1])
                    del delta
                    if spec.same_input[t]:
                        grad_x = gx_t if grad_x is None else grad_x + gx_t
                    else:
                        grads_flat[base] = gx_t.to(xin.dtype)
                if params_need(t):
                    G = g2.t() @ xin.to(cdt).reshape(-1, xin.shape[-1])
                    pdt = cdt if wd is not None else terms_p[t][0].dtype
                    gM = G.to(pdt).mul_(R.to(pdt))
                    del G
                    _scatter_grads(spec, t, gM, _work_params(terms_p[t], wd), terms_p[t], grads_flat, needs)
                    del gM
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return (None, grad_x, None, grad_bias, *grads_flat)


def _param_offset(spec: _Spec, t: int) -> int:
    """Index into ``flat`` of term t's input (its params follow)."""
    return sum(1 + spec.n_params[i] for i in range(t))


def _scatter_grads(spec, t, gM, work_params, params, grads_flat, needs):
    """Map dL/dM to term t's factor params (computed in the work dtype, accumulated in each param's dtype)."""
    base = _param_offset(spec, t)
    grads = spec.factorizations[t].backward(gM, *work_params)
    for j, gr in enumerate(grads):
        if gr is not None and needs[4 + base + 1 + j]:
            gr = gr.to(params[j].dtype)
            grads_flat[base + 1 + j] = gr if grads_flat[base + 1 + j] is None else grads_flat[base + 1 + j] + gr


def hira_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    terms: Sequence[Term],
    *,
    fan_in_fan_out: bool = False,
    include_base: bool = True,
    half_mode: str = "merged",
    gather: Callable | None = None,
) -> torch.Tensor:
    """Compute ``x·W0ᵀ + b + Σ_terms x_in·(R⊙M)ᵀ`` with the memory-lean fused autograd Function.

    Args:
        x: input (..., in).
        weight: W0, (out, in), or (in, out) with ``fan_in_fan_out=True`` (transformers ``Conv1D``). Must be frozen.
            ``None`` is allowed with ``include_base=False`` when every term has its own modulator.
        bias: optional bias of the base layer.
        terms: the adapter contributions; see :class:`Term`.
        include_base: add ``x·W0ᵀ + b`` (False when the base output comes from elsewhere, e.g. a quantised layer).
        half_mode: ``"split"`` or ``"merged"``, the half-precision policy described in the module docstring.
        gather: DeepSpeed ZeRO-3 only: a context-manager factory that gathers the partitioned params (used again in
            backward, where ZeRO-3 has released them).
    """
    if half_mode not in ("split", "merged"):
        raise ValueError(f"half_mode must be 'split' or 'merged', got {half_mode!r}")
    spec = _Spec(
        n_terms=len(terms),
        factorizations=[t.factorization for t in terms],
        n_params=[len(t.params) for t in terms],
        modulators=[t.modulator for t in terms],
        same_input=[t.x_in is x for t in terms],
        include_base=include_base,
        fan_in_fan_out=fan_in_fan_out,
        compute_dtype=_compute_dtype(x),
        half_mode=half_mode,
        device_type=x.device.type,
        gather=gather,
    )
    flat: list = []
    for t in terms:
        flat.append(t.x_in)
        flat.extend(t.params)
    return _HiraLinearFn.apply(spec, x, weight, bias, *flat)


def reference_hira_linear(x, weight, bias, terms: Sequence[Term], fan_in_fan_out=False, include_base=True):
    """Plain-autograd dense reference of :func:`hira_linear` (keeps the dense products; for tests and checks)."""
    W = weight.t() if fan_in_fan_out else weight
    y = F.linear(x, W, bias) if include_base else 0
    for t in terms:
        M = t.factorization.dense(*t.params)
        R = W if t.modulator is None else t.modulator()
        y = y + F.linear(t.x_in, R.to(M.dtype) * M)
    return y
