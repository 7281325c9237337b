"""hira: the HiRA family (Hadamard High-Rank Adaptation) as a registered PEFT tuner.

``import hira`` registers the tuner, then the usual PEFT API applies::

    import hira
    from peft import get_peft_model
    model = get_peft_model(model, hira.HiraConfig(r=32, target_modules=["q_proj", "v_proj"]))
"""

from . import _peft_compat  # first: checks the PEFT version before anything subclasses PEFT's HiRA classes
from .config import HiraConfig, HiraFamilyType
from .functional import Factorization, LowRank, Term, hira_linear
from .model import HiraModel
from .sb import sb_init  # HiRA-SB initialisation (hira/sb.py)


_peft_compat.register(HiraConfig, HiraModel, HiraFamilyType.HIRA_FAMILY)

__all__ = ["Factorization", "HiraConfig", "HiraFamilyType", "HiraModel", "LowRank", "Term", "hira_linear", "sb_init"]
__version__ = "0.1.0"
