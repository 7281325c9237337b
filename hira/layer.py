"""HiRA-family layers: stock PEFT's HiRA layers with the fused path, exact merge/unmerge and extension hooks.

The classes subclass stock PEFT's ``Linear``, ``Embedding``, ``Conv1d/2d/3d`` HiRA layers (via
:mod:`hira._peft_compat`) so parameter names, initialisation and the state-dict layout stay those of stock PEFT
(plain-HiRA checkpoints are interchangeable).

Extension points used by the family variants (``hira/variants.py``):

* ``_adapter_term(adapter, x_in)``: the :class:`hira.functional.Term` of one adapter (factorization, params,
  modulator);
* ``_extra_output(adapter, x_in)``: an additive output that is not of the Hadamard form (HiLoRA's LoRA part);
* ``_additive_delta(adapter, W0)``: the dense additive update ``W' - W0`` in the (out, in) layout, used by merge and
  by the analysis tools.

Runtime options (``fused``, ``half_precision_forward``) are kept per adapter (``hira_runtime``), so adding an adapter
never changes how another one is computed. Which layer types implement which option: docs/tuner.md.

Merge/unmerge: merging writes ``W0 + Σ ΔW`` (computed in at least fp32 from the original W0, for every merged
adapter at once, then cast to the weight dtype) into the base weight and keeps an exact copy of W0 on the CPU until
unmerge restores it. Merging adapters one at a time therefore gives the same weight as merging them together. We do
not recover W0 by the paper's element-wise division ``W' ⊘ (1 + B·A)``: it is ill-conditioned where ``1 + B·A``
approaches 0 and loses the bits of W0 that rounding the merged weight dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _zero3
from . import variants as _variants
from ._peft_compat import BaseTunerLayer, check_adapters_to_merge, embed_scale, stock_layer
from .functional import LOW_RANK, ConvOp, Term, compute_dtype, hira_embedding_delta, hira_linear


@dataclass
class RuntimeOptions:
    """How one adapter's math is computed (not what it computes): not saved in plain-HiRA checkpoints."""

    fused: bool = True
    half_mode: str = "merged"


class HiraFamilyMixin:
    """Shared behaviour of every HiRA-family layer; placed before the stock class in the MRO."""

    # HiRA-family variants (hira/variants.py) keep their extra per-adapter factors/buffers in these containers.
    adapter_layer_names = stock_layer.HiraLayer.adapter_layer_names + _variants.VARIANT_ADAPTER_LAYER_NAMES
    other_param_names = stock_layer.HiraLayer.other_param_names + _variants.VARIANT_OTHER_NAMES + ("hira_runtime",)

    # ---------------------------------------------------------------- configuration

    def update_layer(self, adapter_name, r, config, **kwargs):
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"HiRA rank r must be a positive integer, got r={r!r} for adapter {adapter_name!r}.")
        self._check_supported(config)
        if "hira_runtime" not in self.__dict__:
            self.hira_runtime = {}
        if "_hira_w0" not in self.__dict__:
            self._hira_w0 = None  # exact copy of the original weight while merged
        _variants.ensure_containers(self)
        out = super().update_layer(adapter_name, r, config=config, **kwargs)
        _variants.setup_adapter(self, adapter_name, r, config)  # no-op for plain HiRA
        self.hira_runtime[adapter_name] = RuntimeOptions(
            fused=bool(getattr(config, "fused", True)), half_mode=getattr(config, "half_precision_forward", "merged")
        )
        self.set_adapter(self.active_adapters)
        return out

    def _check_supported(self, config) -> None:
        """Refuse a base layer this type cannot adapt exactly (before any adapter tensor is created)."""

    # ---------------------------------------------------------------- extension hooks

    def _variant(self, adapter: str):
        """The adapter's :class:`hira.variants.AdapterVariant`, or ``None`` for plain HiRA."""
        return self.__dict__.get("hira_variant", {}).get(adapter)

    def _factor_params(self, adapter: str):
        if (v := self._variant(adapter)) is not None:
            return v.factor_params(self, adapter)
        return (self.hira_A[adapter], self.hira_B[adapter])

    def _adapter_term(self, adapter: str, x_in: Optional[torch.Tensor]) -> Term:
        if (v := self._variant(adapter)) is not None:
            term = v.adapter_term(self, adapter, x_in)
        else:
            term = Term(x_in=x_in, factorization=LOW_RANK, params=self._factor_params(adapter), modulator=None)
        term.half_mode = self.hira_runtime[adapter].half_mode
        return term

    def _extra_output(self, adapter: str, x_in: torch.Tensor) -> Optional[torch.Tensor]:
        if (v := self._variant(adapter)) is not None:
            return v.extra_output(self, adapter, x_in)
        return None

    def _delta_dtype(self, adapter: str, W0: torch.Tensor) -> torch.dtype:
        """Merge/analysis precision: at least fp32, wider if the weight or the factors are."""
        dt = torch.promote_types(torch.float32, W0.dtype)
        for p in self._factor_params(adapter):
            dt = torch.promote_types(dt, p.dtype)
        return dt

    def _dense_M(self, adapter: str, dtype=torch.float32) -> torch.Tensor:
        """Dense modulation M in the weight's (out, in) / kernel layout."""
        term = self._adapter_term(adapter, None)
        return term.factorization.dense(*[p.to(dtype) for p in term.params])

    def _additive_delta(self, adapter: str, W0: torch.Tensor) -> torch.Tensor:
        """``W' - W0`` for one adapter in the (out, in) layout (kernel layout for convs). ``W0`` is in that layout."""
        if (v := self._variant(adapter)) is not None:
            return v.additive_delta(self, adapter, W0, self._delta_dtype(adapter, W0))
        dt = self._delta_dtype(adapter, W0)
        term = self._adapter_term(adapter, None)
        R = W0 if term.modulator is None else term.modulator()
        return R.to(dt) * self._dense_M(adapter, dt)

    def get_additive_delta(self, adapter: str) -> torch.Tensor:
        """The dense update ``ΔW = W' - W0`` (out, in) of one adapter, at least fp32 (for analysis tools)."""
        with _zero3.gather(self._gather_params([adapter]), site="read"):
            return self._additive_delta(adapter, self._original_weight_oi()).clone()

    # ---------------------------------------------------------------- helpers

    def _weight_oi(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if getattr(self, "fan_in_fan_out", False) else weight

    def _original_weight_oi(self) -> torch.Tensor:
        """The original (unmerged) base weight in the (out, in) layout."""
        weight = self.get_base_layer().weight
        if self.merged and self._hira_w0 is not None:
            weight = self._hira_w0.to(weight.device)
        return self._weight_oi(weight)

    def _gather_params(self, adapters) -> list:
        """Everything a forward/merge of these adapters reads: base weight and bias, factors, modulator tensors."""
        base = self.get_base_layer()
        params = [base.weight, getattr(base, "bias", None)]
        for a in adapters:
            params.extend(self._factor_params(a))
        return params

    def _dropped(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        drop = self.hira_dropout[adapter]
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            return drop(x)
        return x

    def _adapters_to_apply(self, keys) -> Optional[list[str]]:
        """The active adapters to add in forward, or ``None`` when the base layer alone gives the output: adapters
        disabled (unmerging first if merged), already merged, or none active."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return None
        active = [a for a in self.active_adapters if a in keys]
        if self.merged:
            pending = [a for a in active if a not in self.merged_adapters]
            if pending:
                raise RuntimeError(
                    f"Adapter(s) {pending} are active but not merged, while {self.merged_adapters} are merged into "
                    "this layer's weight: merge them too (merge_adapter) or unmerge first (unmerge_adapter)."
                )
            return None
        return active or None

    def _split_by_path(self, active):
        """(fused adapters, dense-reference adapters); ZeRO-3 needs the fused path."""
        dense = [a for a in active if not self.hira_runtime[a].fused]
        if dense and _zero3.any_partitioned(self._gather_params(active)):
            raise RuntimeError(
                "HiRA under DeepSpeed ZeRO-3 needs the fused path (it gathers W0 in forward and backward); "
                f"adapter(s) {dense} have fused=False. Set `fused=True` in their HiRA config."
            )
        return [a for a in active if a not in dense], dense

    def _dense_delta(self, adapter: str, x_in: torch.Tensor) -> torch.Tensor:
        """Plain-autograd reference of one adapter term (``fused=False``): ``x_in·(R⊙M)ᵀ``."""
        term = self._adapter_term(adapter, x_in)
        cdt = compute_dtype(x_in, term.params)
        M = term.factorization.dense(*[p.to(cdt) for p in term.params])
        R = self._original_weight_oi() if term.modulator is None else term.modulator()
        return F.linear(x_in.to(cdt), R.to(cdt) * M)

    # ---------------------------------------------------------------- merge / unmerge

    def _native(self, delta: torch.Tensor) -> torch.Tensor:
        """(out, in) layout -> the stored weight's layout."""
        return delta.t() if getattr(self, "fan_in_fan_out", False) else delta

    def _merge(self, safe_merge: bool, adapter_names: Optional[list[str]], available_adapters: set[str]) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in available_adapters]
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        every = list(self.merged_adapters) + adapter_names
        factors = [p for a in every for p in self._factor_params(a)]
        with _zero3.gather([weight], modify=True, site="merge"), _zero3.gather(factors, site="merge"):
            if self._hira_w0 is None:
                self._hira_w0 = weight.data.detach().clone().cpu()
            W0 = self._hira_w0.to(weight.device)
            W0_oi = self._weight_oi(W0)
            # W0 + ΣΔW from the original W0 for every merged adapter: one rounding, whatever the merge order
            total = None
            for a in every:
                d = self._additive_delta(a, W0_oi)
                total = d if total is None else total + d
            merged = (W0_oi.to(total.dtype) + total).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"Non-finite values in the merged {weight.dtype} weight of adapter(s) {adapter_names}: the adapter "
                    "is broken or overflows this dtype; nothing was merged."
                )
            weight.data.copy_(self._native(merged))
        self.merged_adapters.extend(adapter_names)

    def _unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        with _zero3.gather([weight], modify=True, site="merge"):
            weight.data.copy_(self._hira_w0.to(device=weight.device, dtype=weight.dtype))
        self._hira_w0 = None
        self.merged_adapters.clear()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active (or the given) adapters into the base weight; ``safe_merge`` checks the merged weight
        for non-finite values in the weight's dtype and leaves the layer untouched if there are any."""
        self._merge(safe_merge=safe_merge, adapter_names=adapter_names, available_adapters=self._adapter_keys())

    def unmerge(self) -> None:
        """Restore the original base weight (exact)."""
        self._unmerge()

    def _adapter_keys(self) -> set[str]:
        return set(self.hira_A)


class Linear(HiraFamilyMixin, stock_layer.Linear):
    """HiRA on ``nn.Linear`` and transformers ``Conv1D`` (``fan_in_fan_out``)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(self.hira_A.keys())
        if active is None:
            return self.base_layer(x, *args, **kwargs)
        fused, dense = self._split_by_path(active)
        x_ins = {a: self._dropped(a, x) for a in active}  # one dropout draw per adapter, shared by its terms
        if fused:
            base = self.get_base_layer()
            params = self._gather_params(fused)
            zero3 = _zero3.any_partitioned(params)
            gather = (lambda: _zero3.gather(params, site="backward")) if zero3 else None
            with _zero3.gather(params, site="forward"):
                terms = [self._adapter_term(a, x_ins[a]) for a in fused]
                y = hira_linear(x, base.weight, base.bias, terms, fan_in_fan_out=self.fan_in_fan_out, gather=gather)
        else:
            y = self.base_layer(x, *args, **kwargs)
        for a in dense:
            y = y + self._dense_delta(a, x_ins[a]).to(y.dtype)
        for a in active:
            extra = self._extra_output(a, x_ins[a])
            if extra is not None:
                y = y + extra.to(y.dtype)
        return y

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """The multiplicative update ``M`` in the weight's layout (stock-PEFT semantics: ``W' = W0 ⊙ (1 + M)``)."""
        return self._native(self._dense_M(adapter))


class Embedding(HiraFamilyMixin, stock_layer.Embedding):
    """HiRA on ``nn.Embedding``; the lookup touches only the rows of the input tokens (no dense product).

    The adapter part is scaled by the base embedding's scalar ``embed_scale`` when it has one (Gemma), so merged and
    unmerged outputs agree. Factor lookups ignore ``padding_idx``/``scale_grad_by_freq``/``sparse`` (options of the
    base lookup and its gradient); ``max_norm`` is refused. ``fused``/``half_precision_forward`` do not apply."""

    def _check_supported(self, config) -> None:
        base = self.get_base_layer()
        if base.max_norm is not None:
            raise ValueError(
                f"HiRA cannot adapt an nn.Embedding with max_norm={base.max_norm}: its lookup renormalises rows of "
                "W0 in place, so the adapter's W0 ⊙ M and a merged W0 + W0 ⊙ M would disagree. Exclude this "
                "module (exclude_modules) or build the embedding without max_norm."
            )
        self._probe_lookup(base)

    @staticmethod
    def _probe_lookup(base) -> None:
        """An embedding subclass must return ``weight[ids]`` (times a scalar ``embed_scale``): the adapter adds
        ``(W0 ⊙ M)[ids]`` scaled the same way. Checked on a few rows when the weight is materialised."""
        if type(base).forward is nn.Embedding.forward:
            return
        w = base.weight
        if w.is_meta or _zero3.is_partitioned_param(w) or w.numel() == 0:
            return
        ids = torch.arange(min(4, base.num_embeddings), device=w.device)
        scale = getattr(base, "embed_scale", 1.0)
        with torch.no_grad():
            expect = F.embedding(ids, w) * (scale.to(w.dtype) if torch.is_tensor(scale) else scale)
            got = base(ids)
        if got.shape != expect.shape or not torch.allclose(got.to(expect.dtype), expect, rtol=1e-3, atol=1e-6):
            raise ValueError(
                f"HiRA cannot adapt {type(base).__name__}: its forward is not weight[ids] (× a scalar embed_scale), "
                "so the adapter could not be applied like its lookup. Exclude this module (exclude_modules)."
            )

    def _adapter_keys(self) -> set[str]:
        return set(self.hira_embedding_A)

    def _factor_params(self, adapter: str):
        return (self.hira_embedding_A[adapter], self.hira_embedding_B[adapter])

    def _dense_M(self, adapter: str, dtype=torch.float32) -> torch.Tensor:
        A, B = self.hira_embedding_A[adapter].to(dtype), self.hira_embedding_B[adapter].to(dtype)
        return (B @ A).t()  # (num_embeddings, dim), the weight's layout

    def _additive_delta(self, adapter: str, W0: torch.Tensor) -> torch.Tensor:
        dt = self._delta_dtype(adapter, W0)
        return W0.to(dt) * self._dense_M(adapter, dt)

    def _weight_oi(self, weight):  # embeddings keep their (num_embeddings, dim) layout everywhere
        return weight

    def get_delta_weight(self, adapter) -> torch.Tensor:
        return self._dense_M(adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(self.hira_embedding_A.keys())
        result = self.base_layer(x, *args, **kwargs)
        if active is None:
            return result
        W0 = self.get_base_layer().weight
        params = self._gather_params(active)
        zero3 = _zero3.any_partitioned(params)
        gather = (lambda: _zero3.gather(params, site="backward")) if zero3 else None
        with _zero3.gather(params, site="forward"):
            delta = hira_embedding_delta(x, W0, [self._factor_params(a) for a in active], gather=gather)
        scale = embed_scale(self)
        if scale is not None:
            delta = delta * scale.to(delta.dtype)
        return result + delta.to(result.dtype)


class _ConvMixin(HiraFamilyMixin):
    """HiRA on convolutions (groups=1, padding_mode='zeros'): one convolution with ``W_eff = W0 ⊙ (1 + M)`` through
    the fused Function (nothing d×k saved, exact gradients, ZeRO-3 gathers), ``M = B·A`` for every kernel shape."""

    def _check_supported(self, config) -> None:
        base = self.get_base_layer()
        if getattr(base, "groups", 1) > 1:
            raise ValueError(
                f"HiRA does not support {type(base).__name__} with groups={base.groups} (>1): the Hadamard product "
                "needs B·A shaped like the grouped weight. Exclude this module (exclude_modules) or use groups=1."
            )
        if base.padding_mode != "zeros":
            raise ValueError(
                f"HiRA conv layers support padding_mode='zeros' only, got {base.padding_mode!r} on "
                f"{type(base).__name__}. Exclude this module (exclude_modules)."
            )

    def _weight_oi(self, weight):
        return weight

    def get_delta_weight(self, adapter) -> torch.Tensor:
        return self._dense_M(adapter)

    def _op(self):
        base = self.get_base_layer()
        return ConvOp(len(base.kernel_size), base.stride, base.padding, base.dilation)  # not weight.dim(): ZeRO-3

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self._adapters_to_apply(self.hira_A.keys())
        if active is None:
            return self.base_layer(x, *args, **kwargs)
        fused, dense = self._split_by_path(active)
        base = self.get_base_layer()
        x_ins = {a: self._dropped(a, x) for a in active}  # one dropout draw per adapter
        if fused:
            params = self._gather_params(fused)
            zero3 = _zero3.any_partitioned(params)
            gather = (lambda: _zero3.gather(params, site="backward")) if zero3 else None
            with _zero3.gather(params, site="forward"):
                terms = [self._adapter_term(a, x_ins[a]) for a in fused]
                y = hira_linear(x, base.weight, base.bias, terms, gather=gather, op=self._op())
        else:
            y = self.base_layer(x, *args, **kwargs)
        op = self._op()
        for a in dense:  # plain-autograd reference (fused=False)
            cdt = compute_dtype(x_ins[a], self._factor_params(a))
            W_delta = self._original_weight_oi().to(cdt) * self._dense_M(a, cdt)
            y = y + op.forward(x_ins[a].to(cdt), W_delta, None).to(y.dtype)
        return y


class Conv1d(_ConvMixin, stock_layer.Conv1d):
    pass


class Conv2d(_ConvMixin, stock_layer.Conv2d):
    pass


class Conv3d(_ConvMixin, stock_layer.Conv3d):
    pass


def dispatch_default(target: nn.Module, adapter_name: str, hira_config, **kwargs) -> Optional[nn.Module]:
    """Wrap ``target`` in the matching HiRA-family layer, or return ``None`` when its type is unsupported."""
    from transformers.pytorch_utils import Conv1D

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    r = kwargs.get("r", hira_config.r)
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, config=hira_config, r=r)
    if isinstance(base, nn.Conv3d):
        return Conv3d(target, adapter_name, config=hira_config, r=r)
    if isinstance(base, nn.Conv2d):
        return Conv2d(target, adapter_name, config=hira_config, r=r)
    if isinstance(base, nn.Conv1d):
        return Conv1d(target, adapter_name, config=hira_config, r=r)
    if isinstance(base, nn.Linear):
        return Linear(target, adapter_name, config=hira_config, r=r, fan_in_fan_out=False)
    if isinstance(base, Conv1D):
        return Linear(target, adapter_name, config=hira_config, r=r, fan_in_fan_out=True, is_target_conv_1d_layer=True)
    return None

