"""The only module that touches PEFT internals: registering the HiRA-family tuner.

PEFT's ``register_peft_method`` only accepts names of its closed ``PeftType`` enum, so the registration writes the
``peft.mapping`` dictionaries directly:

* ``HIRA`` (stock) is pointed at our config/model classes, so plain-HiRA checkpoints (ours and stock PEFT's) load
  with the fused path once ``import hira`` has run;
* ``HIRA_FAMILY`` (our own ``str`` enum) is added for the variants, which stock PEFT cannot load.

The dictionaries are not a documented extension API, hence the version guard. The other coupling to PEFT is by
subclassing: ``hira/layer.py``, ``hira/bnb.py`` and ``hira/model.py`` extend ``peft.tuners.hira``'s public classes
(same parameter names and state-dict layout as stock HiRA); ``hira/__init__.py`` runs :func:`check_peft_version`
before importing them.
"""

from __future__ import annotations

import peft
from packaging.version import Version


SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))  # [low, high)


def check_peft_version() -> None:
    v = Version(peft.__version__)
    if not (SUPPORTED_PEFT[0] <= v < SUPPORTED_PEFT[1]):
        raise ImportError(
            f"hira registers its tuner through peft internals tested with peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}; "
            f"found peft {peft.__version__}. Install the pinned version: pip install peft==0.21.2"
        )


def register(config_cls, model_cls, family_type) -> None:
    check_peft_version()
    from peft import mapping
    from peft.utils import PeftType

    for key in (PeftType.HIRA, family_type):
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = model_cls
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = model_cls.prefix
        mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING[key] = model_cls
