"""The fused HiRA layer: ``y = op(x, W0 + R ⊙ M) + b`` as one autograd Function that saves no d×k tensor.

Notation: ``W0`` is the frozen base weight, ``M`` the dense modulation built from small factors (plain HiRA:
``M = B·A``), ``R`` the fixed modulator (plain HiRA: ``R = W0``), ``op`` the layer's operation (a linear map, or a
convolution). Stock PEFT computes ``base(x) + op(x, W0⊙BA)``: two full-size GEMMs forward, three backward, and autograd
keeps the dense ``W0⊙BA`` alive until backward. Here:

* forward, one GEMM on ``W_eff = W0 + R⊙M`` (plus one per term under the ``"split"`` half-precision policy, below);
* backward, ``grad_x = g·W_eff`` (one GEMM, ``W_eff`` recomputed), ``G = gᵀ·x`` (the weight-gradient GEMM every exact
  HiRA needs), ``dL/dM = R ⊙ G``, then the factorization maps ``dL/dM`` to its factors (plain: ``grad_B = dM·Aᵀ``,
  ``grad_A = Bᵀ·dM``);
* only ``x`` (and, with dropout, ``dropout(x)``) plus the parameters are saved for backward; ``W_eff`` and ``G`` are
  transient.

Dtypes (:func:`compute_dtypes`): under autocast everything runs in the autocast dtype. Otherwise the token GEMMs
(forward and ``grad_x``) run in the input's dtype, as the base layer does, and the adapter math (``M``, ``W_eff``,
the weight-gradient GEMM, the factor gradients) in the promotion of the input's and the factors' dtypes. A bf16
model with fp32 adapters and no autocast therefore trains its adapters with fp32 gradients, like stock PEFT, while
its forward is the merged bf16 model's, and a fresh adapter reproduces the base layer bit for bit. The output has
the GEMM dtype (what the base layer returns).

Half-precision policy (per term; only when the GEMM dtype is bf16/fp16):

* ``"merged"`` (default): the term is folded into the one GEMM on ``W_eff`` rounded to half precision, i.e. the
  precision a merged half-precision model has at inference, and the HiRA authors' own implementation
  (``F.linear(x, W0 ⊙ (1 + BA))``). Entries of ``M`` below the half-precision resolution of ``1 + M`` (≈2⁻⁹ for
  bf16) are invisible in the forward.
* ``"split"``: the forward keeps the term's update at half-precision *relative* resolution, exactly like stock PEFT,
  with its own GEMM ``x·(R⊙M)ᵀ`` next to the base GEMM. The backward is the same in both policies (one GEMM for
  ``grad_x`` on ``W_eff``, one weight-gradient GEMM shared by the folded terms).

Dropout on the adapter input is exact: terms whose input is ``dropout(x)`` rather than ``x`` get their own delta
GEMM (``dropout(x)·(R⊙M)ᵀ``), while the base GEMM sees ``x``.
"""

from __future__ import annotations

import contextlib
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
    """Plain HiRA: ``M = B·A`` with params ``(A, B)``, A r×in, B out×r.

    Convolution factors (PEFT's layout: A ``(r, in, *kernel)``, B ``(out, r, 1, ...)``) are the same product on
    flattened views, ``M = (B.view(out, r) @ A.view(r, -1)).view(out, in, *kernel)``, for every kernel shape."""

    def dense(self, A, B):
        if A.dim() == 2:
            return B @ A
        return (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(B.shape[0], *A.shape[1:])

    def backward(self, grad_M, A, B):
        if A.dim() == 2:
            gA = B.t() @ grad_M if A.requires_grad else None
            gB = grad_M @ A.t() if B.requires_grad else None
            return gA, gB
        g2 = grad_M.reshape(grad_M.shape[0], -1)
        B2, A2 = B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)
        gA = (B2.t() @ g2).reshape(A.shape) if A.requires_grad else None
        gB = (g2 @ A2.t()).reshape(B.shape) if B.requires_grad else None
        return gA, gB


LOW_RANK = LowRank()


@dataclass
class Term:
    """One adapter contribution ``op(x_in, R⊙M)``.

    ``x_in`` is the layer input or a dropped-out copy; ``modulator`` is ``None`` (R = W0) or a zero-argument callable
    returning R (weight layout), called again in backward instead of saving a dense tensor (bitsandbytes
    dequantisation, a regenerated random modulator, ...). ``half_mode`` is this term's half-precision policy
    (``"merged"``/``"split"``); ``None`` takes the default of the :func:`hira_linear` call.
    """

    x_in: torch.Tensor
    factorization: Factorization
    params: Sequence[torch.Tensor]
    modulator: Callable[[], torch.Tensor] | None = None
    half_mode: str | None = None


# ----------------------------------------------------------------------------------------------------------- ops


class LinearOp:
    """``y = x·Wᵀ + b`` over the last dimension of x; W is (out, in)."""

    def forward(self, x, W, b):
        return F.linear(x, W, b)

    def grad_input(self, g, W, x_shape):
        return (g.reshape(-1, g.shape[-1]) @ W).reshape(*x_shape[:-1], W.shape[1])

    def grad_weight(self, g, x, w_shape):
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def grad_bias(self, g):
        return g.reshape(-1, g.shape[-1]).sum(0)


class ConvOp:
    """An N-d convolution with the base layer's stride/padding/dilation (groups=1); W is (out, in, *kernel)."""

    _FNS = {
        1: (F.conv1d, torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
        2: (F.conv2d, torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight),
        3: (F.conv3d, torch.nn.grad.conv3d_input, torch.nn.grad.conv3d_weight),
    }

    def __init__(self, dim: int, stride, padding, dilation):
        self.dim = dim
        self.fwd, self.gin, self.gw = self._FNS[dim]
        self.kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": 1}

    def forward(self, x, W, b):
        return self.fwd(x, W, b, **self.kw)

    def grad_input(self, g, W, x_shape):
        return self.gin(x_shape, W, g, **self.kw)

    def grad_weight(self, g, x, w_shape):
        return self.gw(x, w_shape, g, **self.kw)

    def grad_bias(self, g):
        return g.sum(dim=[d for d in range(g.dim()) if d != 1])


LINEAR = LinearOp()


@dataclass
class _Spec:
    op: object
    n_terms: int
    factorizations: list
    n_params: list
    modulators: list
    same_input: list  # term input is the layer input x (no dropout)
    split: list  # term keeps its own forward GEMM under half precision ("split" policy)
    include_base: bool
    fan_in_fan_out: bool
    gemm_dtype: torch.dtype  # the full-size GEMMs over the tokens: forward and grad_x
    work_dtype: torch.dtype  # the d×k work: M, W_eff, the weight-gradient GEMM, W0 ⊙ G, factor gradients
    device_type: str
    gather: Callable | None = None  # context-manager factory re-gathering ZeRO-3 partitioned params in backward


def compute_dtypes(x: torch.Tensor, params: Sequence[torch.Tensor] = ()) -> tuple[torch.dtype, torch.dtype]:
    """``(gemm dtype, work dtype)``: both the autocast dtype under autocast; otherwise the input's dtype for the
    token GEMMs (what the base layer computes in) and the promotion of the input's and the factors' dtypes for the
    adapter math (a bf16 model with fp32 adapters gets fp32 adapter gradients)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return dt, dt
    gemm = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
    work = gemm
    for p in params:
        if p.dtype.is_floating_point:
            work = torch.promote_types(work, p.dtype)
    return gemm, work


def compute_dtype(x: torch.Tensor, params: Sequence[torch.Tensor] = ()) -> torch.dtype:
    """The adapter-math (work) dtype of :func:`compute_dtypes`."""
    return compute_dtypes(x, params)[1]


def output_dtype(x: torch.Tensor, cdt: torch.dtype) -> torch.dtype:
    """What the base layer would return: the autocast dtype under autocast, the input's dtype otherwise."""
    return cdt if torch.is_autocast_enabled(x.device.type) else x.dtype


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _work_params(params, wd):
    """Factor params in the work dtype (casts keep ``requires_grad``: factorizations use it to skip the gradients
    of frozen factors)."""
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


def _bias(bias, dt):
    return None if bias is None else bias.to(dt)


def _w_eff(spec, W, idx, terms_p):
    """``W0 ⊙ (1 + Σ_idx M)`` built in place in the work dtype, then rounded to the GEMM dtype (W0 itself when idx
    is empty: a fresh adapter computes exactly the base layer's GEMM)."""
    M = _dense_M(spec, idx, terms_p, spec.work_dtype)
    if M is None:
        return W.to(spec.gemm_dtype)
    Wm = W.to(M.dtype)
    M = _like_weight(M, spec)
    return torch.addcmul(Wm, Wm, M, out=M).to(spec.gemm_dtype)


# The d×k work (M, W_eff, W0 ⊙ G) runs in the work dtype: the half autocast dtype under bf16/fp16 autocast (as
# stock PEFT does: half the memory traffic and no fp32 d×k transients), the promoted dtype otherwise. Elementwise
# steps are done in place so that at most two d×k buffers exist at any time.


class _HiraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, x, weight, bias, *flat):
        terms_x, terms_p = _unpack(spec, flat)
        gdt, wdt = spec.gemm_dtype, spec.work_dtype
        op = spec.op
        with torch.autocast(spec.device_type, enabled=False):
            W = None if weight is None else (weight.t() if spec.fan_in_fan_out else weight)
            # Terms sharing the layer input whose modulator is W0 are folded into one W_eff.
            fold = [t for t in range(spec.n_terms) if spec.same_input[t] and spec.modulators[t] is None]
            if not spec.include_base:
                fold = []
            rest = [t for t in range(spec.n_terms) if t not in fold]
            xs = x.to(gdt)
            y = None
            if spec.include_base:
                split = [t for t in fold if _is_half(gdt) and spec.split[t]]
                W_eff = _w_eff(spec, W, [t for t in fold if t not in split], terms_p)
                y = op.forward(xs, W_eff, _bias(bias, gdt))
                del W_eff
                if split:  # W0 ⊙ M at half-precision relative resolution, its own GEMM
                    M = _dense_M(spec, split, terms_p, wdt)
                    y = y + op.forward(xs, M.mul_(_like_weight(W.to(wdt), spec)).to(gdt), None)
                    del M
            for t in rest:
                M = spec.factorizations[t].dense(*_work_params(terms_p[t], wdt))
                R = _modulator(spec, t, W)
                delta = M.mul_(R.to(wdt)).to(gdt)
                del M
                out = op.forward(terms_x[t].to(gdt), delta, None)
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
            return _HiraFn._backward(ctx, g, ctx.saved_tensors)
        # DeepSpeed ZeRO-3 may have released the partitioned params after forward: gather them again.
        with spec.gather():
            return _HiraFn._backward(ctx, g, ctx.saved_tensors)

    @staticmethod
    def _backward(ctx, g, saved):
        spec: _Spec = ctx.spec
        x, weight, bias, *flat = saved
        terms_x, terms_p = _unpack(spec, flat)
        gdt, wdt = spec.gemm_dtype, spec.work_dtype
        op = spec.op
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
            gg, gw = g.to(gdt), g.to(wdt)
            if spec.include_base:
                # grad_x = g · W_eff: one GEMM on the recomputed W_eff (in both half-precision policies).
                if needs[1]:
                    W_eff = _w_eff(spec, W, ctx.fold, terms_p)
                    grad_x = op.grad_input(gg, W_eff, x.shape)
                    del W_eff
                if any(params_need(t) for t in ctx.fold):
                    G = op.grad_weight(gw, x.to(wdt), W.shape)  # the weight-gradient GEMM
                    gM = G.mul_(W.to(wdt))
                    del G
                    for t in ctx.fold:
                        _scatter_grads(spec, t, gM, _work_params(terms_p[t], wdt), terms_p[t], grads_flat, needs)
                    del gM
                if ctx.has_bias and needs[3]:
                    grad_bias = op.grad_bias(gw).to(bias.dtype)
            # Separate terms (dropout input or custom modulator).
            for t in ctx.rest:
                base = _param_offset(spec, t)
                R = _modulator(spec, t, W)
                xin = terms_x[t]
                if needs[4 + base]:
                    M = spec.factorizations[t].dense(*_work_params(terms_p[t], wdt))
                    delta = M.mul_(R.to(wdt)).to(gdt)
                    del M
                    gx_t = op.grad_input(gg, delta, xin.shape)
                    del delta
                    if spec.same_input[t]:
                        grad_x = gx_t if grad_x is None else grad_x + gx_t
                    else:
                        grads_flat[base] = gx_t.to(xin.dtype)
                if params_need(t):
                    G = op.grad_weight(gw, xin.to(wdt), R.shape)
                    gM = G.mul_(R.to(wdt))
                    del G
                    _scatter_grads(spec, t, gM, _work_params(terms_p[t], wdt), terms_p[t], grads_flat, needs)
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
    op=LINEAR,
) -> torch.Tensor:
    """Compute ``op(x, W0) + b + Σ_terms op(x_in, R⊙M)`` with the memory-lean fused autograd Function.

    Args:
        x: input (..., in) for the linear op; (N, C, *spatial) for a :class:`ConvOp`.
        weight: W0, (out, in), or (in, out) with ``fan_in_fan_out=True`` (transformers ``Conv1D``); a conv kernel
            for a :class:`ConvOp`. Must be frozen. ``None`` is allowed with ``include_base=False`` when every term
            has its own modulator.
        bias: optional bias of the base layer.
        terms: the adapter contributions; see :class:`Term`.
        include_base: add ``op(x, W0) + b`` (False when the base output comes from elsewhere, e.g. a quantised
            layer).
        half_mode: the default half-precision policy of terms that do not set their own (module docstring).
        gather: DeepSpeed ZeRO-3 only: a context-manager factory that gathers the partitioned params (used again in
            backward, where ZeRO-3 may have released them).
        op: :data:`LINEAR` (default) or a :class:`ConvOp`.
    """
    modes = [t.half_mode or half_mode for t in terms]
    bad = [m for m in modes if m not in ("split", "merged")]
    if bad:
        raise ValueError(f"half_mode must be 'split' or 'merged', got {bad[0]!r}")
    params = [p for t in terms for p in t.params]
    gdt, wdt = compute_dtypes(x, params)
    spec = _Spec(
        op=op,
        n_terms=len(terms),
        factorizations=[t.factorization for t in terms],
        n_params=[len(t.params) for t in terms],
        modulators=[t.modulator for t in terms],
        same_input=[t.x_in is x for t in terms],
        split=[m == "split" for m in modes],
        include_base=include_base,
        fan_in_fan_out=fan_in_fan_out,
        gemm_dtype=gdt,
        work_dtype=wdt,
        device_type=x.device.type,
        gather=gather,
    )
    flat: list = []
    for t in terms:
        flat.append(t.x_in)
        flat.extend(t.params)
    return _HiraFn.apply(spec, x, weight, bias, *flat)


# ----------------------------------------------------------------------------------------------------------- embedding


class _HiraEmbeddingFn(torch.autograd.Function):
    """``Σ_a W0[ids] ⊙ (A_aᵀ[ids] · B_aᵀ)`` (the adapters' part of a HiRA embedding lookup; no dense product).

    The factor lookups are plain gathers, whatever ``padding_idx``/``max_norm``/``sparse`` options the base
    embedding uses (those shape the base lookup and its gradient, not the adapter's math)."""

    @staticmethod
    def forward(ctx, cdt, gather, ids, weight, *factors):
        with torch.autocast(ids.device.type, enabled=False):  # an embedding lookup is not autocast: neither is this
            rows = F.embedding(ids, weight).to(cdt)
            out = None
            for A, B in zip(factors[0::2], factors[1::2]):
                mod = F.embedding(ids, A.t()).to(cdt) @ B.to(cdt).t()
                out = rows * mod if out is None else out + rows * mod
        ctx.cdt, ctx.gather = cdt, gather
        ctx.save_for_backward(ids, weight, *factors)
        return out

    @staticmethod
    def backward(ctx, g):
        gather = ctx.gather() if ctx.gather is not None else contextlib.nullcontext()
        with gather, torch.autocast(g.device.type, enabled=False):
            ids, weight, *factors = ctx.saved_tensors
            cdt = ctx.cdt
            gr = g.to(cdt) * F.embedding(ids, weight).to(cdt)  # (..., dim)
            gr2 = gr.reshape(-1, gr.shape[-1])
            flat_ids = ids.reshape(-1)
            grads = []
            for j, (A, B) in enumerate(zip(factors[0::2], factors[1::2])):
                need_A, need_B = ctx.needs_input_grad[4 + 2 * j], ctx.needs_input_grad[5 + 2 * j]
                gA = gB = None
                if need_A:
                    rows_grad = gr2 @ B.to(cdt)  # (N, r): d out / d A_aᵀ[ids]
                    gA = torch.zeros(A.shape[1], A.shape[0], dtype=cdt, device=A.device)
                    gA.index_add_(0, flat_ids, rows_grad)
                    gA = gA.t().to(A.dtype)
                if need_B:
                    a_rows = F.embedding(flat_ids, A.t()).to(cdt)  # (N, r)
                    gB = (gr2.t() @ a_rows).to(B.dtype)
                grads += [gA, gB]
        return (None, None, None, None, *grads)


def hira_embedding_delta(ids, weight, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], gather=None):
    """The adapters' output of a HiRA embedding: ``Σ (W0 ⊙ (B·A)ᵀ)[ids]`` for ``factors = [(A, B), ...]``, computed
    from the looked-up rows only, in the widest of the weight's and factors' dtypes."""
    flat = [t for ab in factors for t in ab]
    cdt = weight.dtype
    for p in flat:
        cdt = torch.promote_types(cdt, p.dtype)
    return _HiraEmbeddingFn.apply(cdt, gather, ids, weight, *flat)
