"""QHiRA: HiRA on bitsandbytes 8-bit / 4-bit base layers.

The quantised layer computes the base output; the adapter term ``dropout(x)·(W0 ⊙ M)ᵀ`` uses W0 dequantised on the
fly (in forward and again in backward: the dequantised d×k matrix is never kept between the two). Merge dequantises,
adds ``W0 ⊙ M`` and re-quantises; unmerge restores the original quantised weight object exactly (no division by
``1 + B·A``, no second round of quantisation error).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import bitsandbytes as bnb
import torch
import importlib

stock_bnb = importlib.import_module("peft.tuners.hira.bnb")
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import dequantize_bnb_weight

from .functional import hira_linear
from .layer import HiraFamilyMixin


class _QuantMixin(HiraFamilyMixin):
    def _dequant_oi(self) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight
        state = getattr(weight, "quant_state", None) if isinstance(weight, bnb.nn.Params4bit) else base.state
        if not isinstance(weight, bnb.nn.Params4bit) and state.SCB is None:
            state.SCB = weight.SCB
        return dequantize_bnb_weight(weight, state=state).float()

    def _original_weight_oi(self) -> torch.Tensor:
        return self._dequant_oi()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(self.hira_A.keys())
        result = self.base_layer(x, *args, **kwargs)
        if active is None:
            return result
        x_ins = {a: self._dropped(a, x) for a in active}  # one dropout draw per adapter
        terms = []
        for a in active:
            term = self._adapter_term(a, x_ins[a])
            if term.modulator is None:
                term.modulator = self._dequant_oi
            terms.append(term)
        y = hira_linear(x, None, None, terms, include_base=False, half_mode=self.half_precision_forward)
        result = result + y.to(result.dtype)
        for a in active:
            extra = self._extra_output(a, x_ins[a])
            if extra is not None:
                result = result + extra.to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.hira_A]
        if not adapter_names:
            return
        warnings.warn("Merging HiRA into a quantised layer re-quantises the weight; outputs change by rounding.")
        base = self.get_base_layer()
        W0 = self._dequant_oi()
        merged = W0.clone()
        for a in adapter_names:
            merged += self._additive_delta(a, W0)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"Non-finite values in the merged weight of adapter(s) {adapter_names}; nothing merged.")
        if not self.merged:
            state = getattr(base, "state", None)  # 8-bit: the int8 matrix (CB) and its scales (SCB) live here
            self._quant_original = (base.weight, getattr(state, "CB", None), getattr(state, "SCB", None))
        self._requantize(merged)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        weight, cb, scb = self._quant_original
        base.weight = weight
        if hasattr(base, "state"):
            base.state.reset_grads()  # clears CB/SCB too: restore the original int8 matrix and scales afterwards
            base.state.CB, base.state.SCB = cb, scb
        self._quant_original = None
        self.merged_adapters.clear()


class Linear8bitLt(_QuantMixin, stock_bnb.Linear8bitLt):
    def _requantize(self, w: torch.Tensor) -> None:
        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights).to(
            old.device
        )
        base.state.SCB = None
        base.state.reset_grads()


class Linear4bit(_QuantMixin, stock_bnb.Linear4bit):
    def _requantize(self, w: torch.Tensor) -> None:
        base = self.get_base_layer()
        old = base.weight
        kw = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k not in ("data", "quant_state")}
        kw["requires_grad"] = False
        kw["bnb_quantized"] = False
        base.weight = bnb.nn.Params4bit(w.to(old.dtype if old.dtype.is_floating_point else torch.float32).to("cpu"), **kw).to(old.device)


def dispatch_bnb_8bit(target: torch.nn.Module, adapter_name: str, hira_config, **kwargs):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, bnb.nn.Linear8bitLt):
        kw = {
            "has_fp16_weights": base.state.has_fp16_weights,
            "threshold": base.state.threshold,
            "index": base.index,
        }
        return Linear8bitLt(target, adapter_name, config=hira_config, r=kwargs.get("r", hira_config.r), **kw)
    return None


def dispatch_bnb_4bit(target: torch.nn.Module, adapter_name: str, hira_config, **kwargs):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, bnb.nn.Linear4bit):
        kw = {
            "compute_dtype": base.compute_dtype,
            "compress_statistics": base.weight.compress_statistics,
            "quant_type": base.weight.quant_type,
        }
        return Linear4bit(target, adapter_name, config=hira_config, r=kwargs.get("r", hira_config.r), **kw)
    return None
