"""The only module that touches PEFT internals (names PEFT does not document as an extension API).

Everything here is tested against the PEFT versions in :data:`SUPPORTED_PEFT`; :func:`check_peft_version` runs on
``import hira`` before any class below is subclassed, so an untested PEFT fails loudly at import instead of
misbehaving later. The rest of the package imports PEFT's HiRA classes and helpers from here only:

* registration: ``peft.mapping``'s type -> config/tuner dictionaries (PEFT's ``register_peft_method`` only accepts
  names of its closed ``PeftType`` enum);
* the stock HiRA classes our layers/config/model subclass (same parameter names and state-dict layout);
* per-layer helpers of ``BaseTunerLayer``: moving an adapter to the base layer's device, freezing adapter tensors a
  variant declares non-trainable (``frozen_peft_weight_names``), an embedding's ``embed_scale``, the adapter-dtype
  cast PEFT applies after creating an adapter, and the adapters-to-merge check.
"""

from __future__ import annotations

import importlib

import peft
from packaging.version import Version


SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))  # [low, high)


def check_peft_version() -> None:
    v = Version(peft.__version__)
    if not (SUPPORTED_PEFT[0] <= v < SUPPORTED_PEFT[1]):
        raise ImportError(
            f"hira uses peft internals tested with peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}; "
            f"found peft {peft.__version__}. Install the pinned version: pip install peft==0.21.2"
        )


check_peft_version()

# ------------------------------------------------------------------------------------------- stock classes / helpers
from peft import HiraConfig as StockHiraConfig  # noqa: E402
from peft.import_utils import is_bnb_4bit_available, is_bnb_available  # noqa: E402
from peft.tuners._buffer_dict import BufferDict  # noqa: E402
from peft.tuners.hira import layer as stock_layer  # noqa: E402
from peft.tuners.hira.model import HiraModel as StockHiraModel  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge  # noqa: E402
from peft.utils import PeftType  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402


def stock_bnb():
    """``peft.tuners.hira.bnb`` (imports bitsandbytes: only called where bitsandbytes is installed)."""
    return importlib.import_module("peft.tuners.hira.bnb")


__all__ = [
    "BaseTunerLayer", "BufferDict", "PeftType", "StockHiraConfig", "StockHiraModel", "check_adapters_to_merge",
    "get_pattern_key", "is_bnb_4bit_available", "is_bnb_available", "stock_layer", "stock_bnb",
]


# ------------------------------------------------------------------------------------------- registration
def register(config_cls, model_cls, family_type) -> None:
    """Point stock ``HIRA`` and our ``HIRA_FAMILY`` at the given config/tuner classes."""
    from peft import mapping

    for key in (PeftType.HIRA, family_type):
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = model_cls
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = model_cls.prefix
        mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING[key] = model_cls


# ------------------------------------------------------------------------------------------- per-layer helpers
def move_adapter_to_base_device(layer, adapter: str) -> None:
    """Put ``adapter``'s tensors on the base layer's device (and float dtype rules) as PEFT does for its own."""
    layer._move_adapter_to_device_of_base_layer(adapter)


def set_frozen_factors(layer, adapter: str, names: tuple[str, ...]) -> None:
    """Declare ``layer.<name>[adapter]`` non-trainable for the given container names (PEFT keeps them frozen through
    ``set_adapter``); ``names=()`` removes the declaration."""
    frozen = {k: v for k, v in layer.frozen_peft_weight_names.items() if k != adapter}
    if names:
        frozen[adapter] = tuple(names)
    layer.frozen_peft_weight_names = frozen
    if names:
        layer._freeze_non_trainable_peft_weights(adapter)


def embed_scale(layer):
    """The scalar ``embed_scale`` an embedding subclass multiplies its lookup by (Gemma), or ``None``."""
    base = layer.get_base_layer()
    scale = getattr(base, "embed_scale", None)
    if scale is None:
        return None
    if hasattr(scale, "numel") and scale.numel() != 1:
        raise ValueError(
            f"{type(base).__name__}.embed_scale has shape {tuple(scale.shape)}; HiRA supports a scalar embed_scale "
            "only (the adapter output must be scaled like the base lookup). Exclude this embedding."
        )
    return layer._get_embed_scale()


def cast_adapter_dtype(tuner_model, adapter_name: str, autocast_adapter_dtype: bool) -> None:
    """PEFT's upcast of bf16/fp16 adapter tensors to fp32, keeping every tensor's ``requires_grad``.

    PEFT re-creates each cast tensor as a new ``nn.Parameter`` (trainable by default), which would silently
    re-enable factors a variant keeps frozen (HiRA-SB's B and A) and adapters loaded for inference."""
    flags = {}
    for layer in tuner_model.model.modules():
        if isinstance(layer, BaseTunerLayer):
            for name in layer.adapter_layer_names:
                container = getattr(layer, name, None)
                if container is not None and adapter_name in container:
                    flags[(id(layer), name)] = container[adapter_name].requires_grad
    StockHiraModel._cast_adapter_dtype(tuner_model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
    for layer in tuner_model.model.modules():
        if isinstance(layer, BaseTunerLayer):
            for name in layer.adapter_layer_names:
                key = (id(layer), name)
                if key in flags:
                    getattr(layer, name)[adapter_name].requires_grad_(flags[key])
