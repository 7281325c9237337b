"""QHiRA: HiRA on bitsandbytes 8-bit / 4-bit base layers.

The quantised layer computes the base output; the adapter term ``dropout(x)·(W0 ⊙ M)ᵀ`` uses W0 dequantised on the
fly (in forward and again in backward: the dequantised d×k matrix is never kept between the two). Merge dequantises
the *original* quantised W0, adds ``ΣΔW`` of every merged adapter and quantises once; unmerge restores the original
quantised weight object exactly (no division by ``1 + B·A``, no second round of quantisation error).

bitsandbytes' CPU fast path for 4-bit (AVX512-BF16 machines) repacks the weight in place the first time the layer
runs in eval mode; the packed layout is not the one its dequantisation reads, so a HiRA-wrapped layer keeps the
standard layout: the repacking is switched off on the wrapped layer, and a weight already packed before wrapping
is refused (bitsandbytes' inverse of the packing is only approximate for nested quantisation statistics).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import bitsandbytes as bnb
import torch

from ._peft_compat import BaseTunerLayer, check_adapters_to_merge, stock_bnb
from .functional import hira_linear
from .layer import HiraFamilyMixin


def _dequantize(weight, scb=None) -> torch.Tensor:
    """Float32 copy of a bitsandbytes weight: ``Params4bit`` with its quant_state, or int8 data with scales ``scb``."""
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if weight.data.dtype != torch.int8:  # 8-bit layer not quantised yet (it quantises on its first forward/.to)
        return weight.data.float()
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.data.device)).float()


class _QuantMixin(HiraFamilyMixin):
    _hira_quant_original = None  # (weight, CB, SCB) of the quantised W0 while merged

    def _scales(self):
        """Current 8-bit row scales (``None`` for 4-bit)."""
        base = self.get_base_layer()
        if isinstance(base.weight, bnb.nn.Params4bit):
            return None
        state = base.state
        return state.SCB if state.SCB is not None else base.weight.SCB

    def _dequant_oi(self) -> torch.Tensor:
        """The current base weight, dequantised (out, in), fp32."""
        return _dequantize(self.get_base_layer().weight, self._scales())

    def _original_weight_oi(self) -> torch.Tensor:
        if self.merged and self._hira_quant_original is not None:
            weight, _, scb = self._hira_quant_original
            return _dequantize(weight, scb)
        return self._dequant_oi()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply(self.hira_A.keys())
        result = self.base_layer(x, *args, **kwargs)
        if active is None:
            return result
        fused, dense = self._split_by_path(active)
        x_ins = {a: self._dropped(a, x) for a in active}  # one dropout draw per adapter
        terms = []
        for a in fused:
            term = self._adapter_term(a, x_ins[a])
            if term.modulator is None:
                term.modulator = self._dequant_oi
            terms.append(term)
        if terms:
            result = result + hira_linear(x, None, None, terms, include_base=False).to(result.dtype)
        for a in dense:
            result = result + self._dense_delta(a, x_ins[a]).to(result.dtype)
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
        W0 = self._original_weight_oi()
        merged = W0.clone()
        for a in list(self.merged_adapters) + adapter_names:
            merged += self._additive_delta(a, W0).to(merged.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"Non-finite values in the merged weight of adapter(s) {adapter_names}; nothing merged.")
        if not self.merged:
            state = getattr(base, "state", None)  # 8-bit: the int8 matrix (CB) and its scales (SCB) live here
            self._hira_quant_original = (base.weight, getattr(state, "CB", None), self._scales())
        self._requantize(merged)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        weight, cb, scb = self._hira_quant_original
        base.weight = weight
        if hasattr(base, "state"):
            base.state.reset_grads()  # clears CB/SCB too: restore the original int8 matrix and scales afterwards
            base.state.CB, base.state.SCB = cb, scb
        self._hira_quant_original = None
        self.merged_adapters.clear()


class Linear8bitLt(_QuantMixin, stock_bnb().Linear8bitLt):
    def _requantize(self, w: torch.Tensor) -> None:
        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights).to(
            old.device
        )
        base.state.SCB = None
        base.state.reset_grads()


class Linear4bit(_QuantMixin, stock_bnb().Linear4bit):
    def _check_supported(self, config) -> None:
        _standard_4bit_layout(self.get_base_layer())

    def _requantize(self, w: torch.Tensor) -> None:
        base = self.get_base_layer()
        old = base.weight
        kw = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k not in ("data", "quant_state")}
        kw["requires_grad"] = False
        kw["bnb_quantized"] = False
        dtype = old.dtype if old.dtype.is_floating_point else torch.float32
        base.weight = bnb.nn.Params4bit(w.to(dtype).to("cpu"), **kw).to(old.device)


def _standard_4bit_layout(base) -> None:
    """Keep a 4-bit weight in the layout ``dequantize_4bit`` reads (see the module docstring)."""
    state = getattr(base.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "This 4-bit layer already ran in eval mode on a CPU with AVX512-BF16, and bitsandbytes repacked its "
            "weight into a CPU-only layout whose standard form (the one HiRA's W0 ⊙ M reads) it restores only "
            "approximately. Apply HiRA before the model's first eval-mode forward (e.g. right after loading it)."
        )
    if getattr(base, "support_avx512bf16_for_cpu", False):
        base.support_avx512bf16_for_cpu = False


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
