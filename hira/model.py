"""``HiraModel``: stock PEFT's HiRA tuner model, dispatching to the HiRA-family layers."""

from __future__ import annotations

import re

from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.hira.model import HiraModel as _StockHiraModel

from .layer import HiraFamilyMixin, dispatch_default
from .variants import finalize_adapter


class HiraModel(_StockHiraModel):
    """The tuner behind ``get_peft_model(model, hira.HiraConfig(...))`` (and stock ``peft.HiraConfig`` once
    ``import hira`` has run). Same prefix (``hira_``) and state-dict layout as stock PEFT."""

    prefix: str = "hira_"
    tuner_layer_cls = HiraFamilyMixin

    def _create_and_replace(self, hira_config, adapter_name, target, target_name, parent, current_key):
        if isinstance(target, HiraFamilyMixin):
            from peft.utils.other import get_pattern_key

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

    def _check_target_module_exists(self, peft_config, key):
        return super()._check_target_module_exists(peft_config, key)

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config[adapter_name]
        _check_targets_exist(model, config)
        out = super().inject_adapter(model, adapter_name, *args, **kwargs)
        finalize_adapter(model, adapter_name)  # HiRA-family variants: model-level setup (smooth modulator)
        return out


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
