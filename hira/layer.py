"""HiRA-family layers: stock PEFT's HiRA layers with the fused path, exact merge/unmerge and extension hooks.

The classes subclass ``peft.tuners.hira.layer.{Linear, Embedding, Conv1d, Conv2d, Conv3d}`` so parameter names,
initialisation and the state-dict layout stay those of stock PEFT (plain-HiRA checkpoints are interchangeable).

Extension points used by the family variants (``hira/variants.py``):

* ``_adapter_term(adapter, x_in)``: the :class:`hira.functional.Term` of one adapter (factorization, params,
  modulator);
* ``_extra_output(adapter, x_in)``: an additive output that is not of the Hadamard form (HiLoRA's LoRA part);
* ``_additive_delta(adapter, W0)``: the dense additive update ``W' - W0`` in the (out, in) layout, used by merge and
  by the analysis tools.

Merge/unmerge: merging writes ``W0 + Σ R⊙M`` (computed in fp32) into the base weight and keeps an exact copy of W0 on
the CPU until unmerge restores it. We do not recover W0 by the paper's element-wise division ``W' ⊘ (1 + B·A)``:
it is ill-conditioned where ``1 + B·A`` approaches 0 and loses the bits of W0 that rounding the merged weight
dropped, so an unmerge would not give back the original model. ``merge_and_unload`` discards the copy with the
wrapper.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.hira import layer as stock
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from . import variants as _variants
from .functional import LOW_RANK, Term, hira_linear


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gather_ctx(params, modify: bool = False):
    """A context manager that gathers DeepSpeed ZeRO-3 partitioned params, or a no-op otherwise.

    ``modify=True`` (merge/unmerge) makes rank 0's in-place changes the ones every rank keeps; otherwise the gather
    is read-only."""
    zparams = [p for p in params if p is not None and _is_zero3_param(p)]
    if not zparams:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Only gather what is partitioned right now: params DeepSpeed's own module hooks already fetched stay under
    # DeepSpeed's control (freeing them here would break its bookkeeping).
    missing = [p for p in zparams if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not missing:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(missing, modifier_rank=0 if modify else None)


class HiraFamilyMixin:
    """Shared behaviour of every HiRA-family layer; placed before the stock class in the MRO."""

    # HiRA-family variants (hira/variants.py) keep their extra per-adapter factors/buffers in these containers.
    adapter_layer_names = stock.HiraLayer.adapter_layer_names + _variants.VARIANT_ADAPTER_LAYER_NAMES
    other_param_names = stock.HiraLayer.other_param_names + _variants.VARIANT_OTHER_NAMES

    # ---------------------------------------------------------------- configuration

    def _family_init(self, config) -> None:
        self.fused = bool(getattr(config, "fused", True))
        self.half_precision_forward = getattr(config, "half_precision_forward", "merged")

    def update_layer(self, adapter_name, r, config, **kwargs):
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"HiRA rank r must be a positive integer, got r={r!r} for adapter {adapter_name!r}.")
        self._family_init(config)
        _variants.ensure_containers(self)
        out = super().update_layer(adapter_name, r, config=config, **kwargs)
        _variants.setup_adapter(self, adapter_name, r, config)  # no-op for plain HiRA
        self.set_adapter(self.active_adapters)
        return out

    # ---------------------------------------------------------------- extension hooks

    def _variant(self, adapter: str):
        """The adapter's :class:`hira.variants.AdapterVariant`, or ``None`` for plain HiRA."""
        return self.__dict__.get("hira_variant", {}).get(adapter)

    def _factor_params(self, adapter: str):
        if (v := self._variant(adapter)) is not None:
            return v.factor_params(self, adapter)
        return (self.hira_A[adapter], self.hira_B[adapter])

    def _adapter_term(self, adapter: str, x_in: torch.Tensor) -> Term:
        if (v := self._variant(adapter)) is not None:
            return v.adapter_term(self, adapter, x_in)
        return Term(x_in=x_in, factorization=LOW_RANK, params=self._factor_params(adapter), modulator=None)

    def _extra_output(self, adapter: str, x_in: torch.Tensor) -> Optional[torch.Tensor]:
        if (v := self._variant(adapter)) is not None:
            return v.extra_output(self, adapter, x_in)
        return None

    def _dense_M(self, adapter: str) -> torch.Tensor:
        """Dense modulation M (out, in) in fp32."""
        term = self._adapter_term(adapter, None)
        return term.factorization.dense(*[p.float() for p in term.params])

    def _additive_delta(self, adapter: str, W0: torch.Tensor) -> torch.Tensor:
        """``W' - W0`` for one adapter in the (out, in) layout, fp32. ``W0`` is (out, in)."""
        if (v := self._variant(adapter)) is not None:
            return v.additive_delta(self, adapter, W0)
        term = self._adapter_term(adapter, None)
        M = term.factorization.dense(*[p.float() for p in term.params])
        R = W0.float() if term.modulator is None else term.modulator().float()
        return R * M

    def get_additive_delta(self, adapter: str) -> torch.Tensor:
        """The dense update ``ΔW = W' - W0`` (out, in) of one adapter, fp32 (for analysis tools)."""
        W0 = self._original_weight_oi()
        return self._additive_delta(adapter, W0)

    # ---------------------------------------------------------------- helpers

    def _weight_oi(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if getattr(self, "fan_in_fan_out", False) else weight

    def _original_weight_oi(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        if self.merged and self._base_weight_before_merge is not None:
            weight = self._base_weight_before_merge.to(weight.device)
        return self._weight_oi(weight)

    def _dropped(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        drop = self.hira_dropout[adapter]
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            return drop(x)
        return x

    def _active(self, keys) -> list[str]:
        return [a for a in self.active_adapters if a in keys]

    def _adapters_to_apply(self, keys) -> Optional[list[str]]:
        """The active adapters to add in forward, or ``None`` when the base layer alone gives the output: adapters
        disabled (unmerging first if merged), already merged, or none active."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return None
        if self.merged:
            return None
        return self._active(keys) or None

    # ---------------------------------------------------------------- merge / unmerge

    def _merge(self, safe_merge: bool, adapter_names: Optional[list[str]], available_adapters: set[str]) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in available_adapters]
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        with gather_ctx([weight], modify=True):
            W0 = self._get_base_weight_before_merge()  # exact original, stored on CPU until unmerge
            W0_oi = self._weight_oi(W0)
            merged = self._weight_oi(weight.data).float().clone()
            for a in adapter_names:
                merged += self._additive_delta(a, W0_oi).to(merged.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"Non-finite values in the merged weight of adapter(s) {adapter_names}: the adapter is broken; "
                    "nothing was merged."
                )
            merged = merged.t() if getattr(self, "fan_in_fan_out", False) else merged
            weight.data.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(adapter_names)

    def _unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        with gather_ctx([weight], modify=True):
            weight.data.copy_(self._base_weight_before_merge.to(device=weight.device, dtype=weight.dtype))
        self._base_weight_before_merge = None
        self.merged_adapters.clear()


class Linear(HiraFamilyMixin, stock.Linear):
    """HiRA on ``nn.Linear`` and transformers ``Conv1D`` (``fan_in_fan_out``)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(self.hira_A.keys())
        if active is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        params = [weight, bias] + [p for a in active for p in self._factor_params(a)]
        zero3 = any(_is_zero3_param(p) for p in params if p is not None)
        if zero3 and not self.fused:
            raise RuntimeError(
                "HiRA under DeepSpeed ZeRO-3 needs the fused path (it gathers W0 in forward and backward); "
                "set `fused=True` in the HiRA config."
            )
        if not self.fused:
            return self._forward_dense(x, active, *args, **kwargs)
        x_ins = {a: self._dropped(a, x) for a in active}  # one dropout draw per adapter, shared by its terms
        terms = [self._adapter_term(a, x_ins[a]) for a in active]
        gather = (lambda: gather_ctx(params)) if zero3 else None
        with gather_ctx(params):
            y = hira_linear(
                x,
                weight,
                bias,
                terms,
                fan_in_fan_out=self.fan_in_fan_out,
                half_mode=self.half_precision_forward,
                gather=gather,
            )
        for a in active:
            extra = self._extra_output(a, x_ins[a])
            if extra is not None:
                y = y + extra.to(y.dtype)
        return y

    def _forward_dense(self, x, active, *args, **kwargs):
        """Plain-autograd reference path (``fused=False``): base(x) + Σ dropout(x)·(R⊙M)ᵀ."""
        result = self.base_layer(x, *args, **kwargs)
        W = self._weight_oi(self.get_base_layer().weight)
        for a in active:
            x_in = self._dropped(a, x)
            term = self._adapter_term(a, x_in)
            M = term.factorization.dense(*term.params)
            R = W if term.modulator is None else term.modulator()
            result = result + F.linear(x_in.to(M.dtype), R.to(M.dtype) * M).to(result.dtype)
            extra = self._extra_output(a, x_in)
            if extra is not None:
                result = result + extra.to(result.dtype)
        return result

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """The multiplicative update ``M`` in the weight's layout (stock-PEFT semantics: ``W' = W0 ⊙ (1 + M)``)."""
        M = self._dense_M(adapter)
        return M.t() if self.fan_in_fan_out else M


class Embedding(HiraFamilyMixin, stock.Embedding):
    """HiRA on ``nn.Embedding``; the lookup touches only the rows of the input tokens (no dense product)."""

    def _factor_params(self, adapter: str):
        return (self.hira_embedding_A[adapter], self.hira_embedding_B[adapter])

    def _additive_delta(self, adapter: str, W0: torch.Tensor) -> torch.Tensor:
        # weight layout is (num_embeddings, dim); M = (B·A)ᵀ in that layout
        return W0.float() * self.get_delta_weight(adapter)

    def _weight_oi(self, weight):  # embeddings keep their (num_embeddings, dim) layout everywhere
        return weight

    def get_delta_weight(self, adapter) -> torch.Tensor:
        A, B = self.hira_embedding_A[adapter].float(), self.hira_embedding_B[adapter].float()
        return (B @ A).t()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(self.hira_embedding_A.keys())
        result = self.base_layer(x, *args, **kwargs)
        if active is None:
            return result
        W0 = self.get_base_layer().weight
        rows = self._embed(x, W0)  # (..., dim)
        for a in active:
            A, B = self.hira_embedding_A[a], self.hira_embedding_B[a]
            # (W0 ⊙ (B·A)ᵀ)[x] = W0[x] ⊙ (Aᵀ[x] · Bᵀ): gather r numbers per token, no num_embeddings×dim product
            mod = self._embed(x, A.t()) @ B.t()
            result = result + (rows.to(mod.dtype) * mod).to(result.dtype)
        return result


class _ConvMixin(HiraFamilyMixin):
    """HiRA on convolutions (groups=1): one convolution with ``W_eff = W0 ⊙ (1 + M)``."""

    def update_layer(self, adapter_name, r, config, **kwargs):
        base = self.get_base_layer()
        if getattr(base, "groups", 1) > 1:
            raise ValueError(
                f"HiRA does not support {type(base).__name__} with groups={base.groups} (>1): the Hadamard product "
                "needs B·A shaped like the grouped weight. Exclude this module (exclude_modules) or use groups=1."
            )
        return super().update_layer(adapter_name, r, config=config, **kwargs)

    def _dense_M(self, adapter: str) -> torch.Tensor:
        return self.get_delta_weight(adapter).float()  # stock _ConvNd's (B·A as a conv kernel)

    def _additive_delta(self, adapter, W0):
        return W0.float() * self._dense_M(adapter)

    def _weight_oi(self, weight):
        return weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self._adapters_to_apply(self.hira_A.keys())
        if active is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        W0 = base.weight
        conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation, "groups": base.groups}
        if base.padding_mode != "zeros":
            raise ValueError(f"HiRA conv layers support padding_mode='zeros' only, got {base.padding_mode!r}.")
        x_ins = {a: self._dropped(a, x) for a in active}  # one dropout draw per adapter
        fold = [a for a in active if x_ins[a] is x]
        result = None
        if fold:
            M = sum(self.get_delta_weight(a) for a in fold)
            W_eff = (W0.to(M.dtype) * (1 + M)).to(x.dtype)
            result = self.conv_fn(x, W_eff, base.bias, **conv)
        else:
            result = self.base_layer(x, *args, **kwargs)
        for a in active:
            if a in fold:
                continue
            x_in = x_ins[a]
            M = self.get_delta_weight(a)
            result = result + self.conv_fn(x_in.to(M.dtype), W0.to(M.dtype) * M, None, **conv).to(result.dtype)
        return result


class Conv1d(_ConvMixin, stock.Conv1d):
    pass


class Conv2d(_ConvMixin, stock.Conv2d):
    pass


class Conv3d(_ConvMixin, stock.Conv3d):
    pass


def dispatch_default(target: nn.Module, adapter_name: str, hira_config, **kwargs) -> Optional[nn.Module]:
    """Wrap ``target`` in the matching HiRA-family layer, or return ``None`` when its type is unsupported."""
    from peft.tuners.tuners_utils import BaseTunerLayer
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
