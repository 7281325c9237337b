"""``HiraModel``: stock PEFT's HiRA tuner model, dispatching to the HiRA-family layers."""

from __future__ import annotations

import re

from . import _zero3
from ._names import split_layer_index
from ._peft_compat import StockHiraModel, cast_adapter_dtype, get_pattern_key, is_bnb_4bit_available, is_bnb_available
from .layer import HiraFamilyMixin, dispatch_default
from .variants import set_smooth_modulator


class HiraModel(StockHiraModel):
    """The tuner behind ``get_peft_model(model, hira.HiraConfig(...))`` (and stock ``peft.HiraConfig`` once
    ``import hira`` has run). Same prefix (``hira_``) and state-dict layout as stock PEFT."""

    prefix: str = "hira_"
    tuner_layer_cls = HiraFamilyMixin

    def _create_and_replace(self, hira_config, adapter_name, target, target_name, parent, current_key):
        if isinstance(target, HiraFamilyMixin):
            r_key = get_pattern_key(hira_config.rank_pattern.keys(), current_key)
            r = hira_config.rank_pattern.get(r_key, hira_config.r)
            target.update_layer(adapter_name, r, config=hira_config)
            return
        return super()._create_and_replace(hira_config, adapter_name, target, target_name, parent, current_key)

    @staticmethod
    def _create_new_module(hira_config, adapter_name, target, **kwargs):
        dispatchers = []
        if is_bnb_available():
            from .bnb import dispatch_bnb_8bit

            dispatchers.append(dispatch_bnb_8bit)
        if is_bnb_4bit_available():
            from .bnb import dispatch_bnb_4bit

            dispatchers.append(dispatch_bnb_4bit)
        dispatchers.append(dispatch_default)
        for dispatcher in dispatchers:
            new_module = dispatcher(target, adapter_name, hira_config=hira_config, **kwargs)
            if new_module is not None:
                return new_module
        raise ValueError(
            f"HiRA cannot adapt module of type {type(target).__name__}: supported are torch.nn.Linear, "
            "torch.nn.Embedding, torch.nn.Conv1d/2d/3d (groups=1), transformers Conv1D and bitsandbytes "
            "Linear8bitLt/Linear4bit. Remove it from target_modules (or add it to exclude_modules)."
        )

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config[adapter_name]
        if hasattr(config, "refresh"):
            config.refresh()  # fields edited after construction: validated again, peft type derived again
        _check_targets_exist(model, config)
        out = super().inject_adapter(model, adapter_name, *args, **kwargs)
        _finalize_adapter(model, adapter_name, getattr(config, "layers_pattern", None))
        return out

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        cast_adapter_dtype(self, adapter_name, autocast_adapter_dtype)


def _check_targets_exist(model, config) -> None:
    """Name every requested target module that matches nothing (PEFT only reports when *none* match)."""
    targets = config.target_modules
    if targets is None or isinstance(targets, str):
        return  # regex / 'all-linear' / architecture default: PEFT's own check applies
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) or re.fullmatch(t, n) for n in names)]
    if missing:
        leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())})
        raise ValueError(
            f"Target module(s) {missing} not found in {type(model).__name__}. Check the names for this "
            f"architecture; its leaf modules are: {leaf[:40]}{' ...' if len(leaf) > 40 else ''}."
        )


def _finalize_adapter(model, adapter: str, layers_pattern=None) -> None:
    """Model-level setup after injection: the ``smooth`` modulator's neighbour means (same module, same expert, in
    the decoder layers below and above; see :mod:`hira._names` for how the layer index is read)."""
    names = dict(model.named_modules())
    for name, layer in names.items():
        if not isinstance(layer, HiraFamilyMixin):
            continue
        spec = layer.__dict__.get("hira_variant", {}).get(adapter)
        if spec is None or spec.modulator != "smooth":
            continue
        split = split_layer_index(name, layers_pattern)
        if split is None:
            raise ValueError(
                f"The smooth modulator averages a module with the same module in the layers above and below; "
                f"{name!r} has no layer index in its name."
            )
        pre, idx, suf = split
        weights = []
        for j in (idx - 1, idx, idx + 1):
            other = names.get(f"{pre}{j}{suf}")
            if other is None:
                continue
            if isinstance(other, HiraFamilyMixin):
                with _zero3.gather([other.get_base_layer().weight], site="read"):
                    w = other._original_weight_oi().detach().clone()
            else:
                w = getattr(other, "weight", None)
                if w is None:
                    continue
                with _zero3.gather([w], site="read"):
                    w = w.detach().clone()
                    if getattr(layer, "fan_in_fan_out", False):
                        w = w.t()
            if w.shape == (layer.out_features, layer.in_features):
                weights.append(w)
        set_smooth_modulator(layer, adapter, weights)
