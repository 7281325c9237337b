"""``HiraConfig``: the configuration of the HiRA family tuner.

It extends stock PEFT's ``HiraConfig`` (same fields, same defaults, same ``hira_A``/``hira_B`` parameter names), so a
plain-HiRA adapter trained here is a stock-PEFT HiRA checkpoint: ``peft_type`` is ``HIRA`` and ``adapter_config.json``
holds only the stock fields. Anything stock PEFT cannot represent (the family variants) is saved with
``peft_type = HIRA_FAMILY``, which stock PEFT refuses loudly (``KeyError``/``ValueError``) instead of loading it as
plain HiRA.

Runtime-only options (``fused``, ``half_precision_forward``) change how the same math is computed, not the math, and
are not written into plain-HiRA checkpoints.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Literal

from peft import HiraConfig as _StockHiraConfig
from peft.utils import PeftType


class HiraFamilyType(str, enum.Enum):
    """PEFT type of checkpoints that only this package can load (variants of HiRA)."""

    HIRA_FAMILY = "HIRA_FAMILY"


# Fields whose non-default value changes the adapter's math (they make a checkpoint a "family" checkpoint).
_VARIANT_DEFAULTS: dict[str, object] = {"variant": "hira", "modulator": "weight"}
# Fields that only choose how the math is computed.
_RUNTIME_FIELDS = ("fused", "half_precision_forward")


@dataclass
class HiraConfig(_StockHiraConfig):
    """Configuration of a HiRA-family adapter: ``W' = W0 + R ⊙ M``; plain HiRA is ``R = W0``, ``M = B·A``.

    All stock ``peft.HiraConfig`` fields (``r``, ``target_modules``, ``hira_dropout``, ``init_weights``, ...) keep
    their meaning. Extra fields:

    Args:
        variant: ``"hira"`` (default). Other members of the family are added by the variant modules.
        modulator: the fixed matrix R of ``ΔW = R ⊙ (B·A)``; ``"weight"`` (W0, the paper's HiRA) by default.
        fused: use the fused one-GEMM path (:mod:`hira.functional`). ``False`` computes the dense formula with plain
            autograd (stock-PEFT-like memory); useful for debugging.
        half_precision_forward: ``"split"`` (default) or ``"merged"``: the forward in bf16/fp16; see
            :mod:`hira.functional`. Full-precision (fp32/fp64) compute always uses the exact one-GEMM forward.
    """

    variant: Literal["hira"] = field(default="hira", metadata={"help": "Member of the HiRA family: hira."})
    modulator: Literal["weight"] = field(
        default="weight", metadata={"help": "Fixed modulator R in ΔW = R ⊙ (B·A): weight (W0)."}
    )
    fused: bool = field(default=True, metadata={"help": "Use the fused, memory-lean autograd path."})
    half_precision_forward: Literal["split", "merged"] = field(
        default="split",
        metadata={
            "help": "bf16/fp16 forward: 'split' keeps the update at half-precision relative resolution (2 GEMMs); "
            "'merged' uses one GEMM on W0⊙(1+BA) rounded to half precision (merged-weight precision)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_family()
        self.peft_type = PeftType.HIRA if self.is_plain_hira else HiraFamilyType.HIRA_FAMILY

    # Variant modules extend these checks.
    _valid_variants = ("hira",)
    _valid_modulators = ("weight",)

    def _validate_family(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"HiRA rank r must be a positive integer, got r={self.r!r}. Use e.g. r=32.")
        for name, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{name!r}] must be a positive integer, got {rank!r}.")
        if self.variant not in self._valid_variants:
            raise ValueError(f"Unknown HiRA variant {self.variant!r}; choose one of {list(self._valid_variants)}.")
        if self.modulator not in self._valid_modulators:
            raise ValueError(f"Unknown modulator {self.modulator!r}; choose one of {list(self._valid_modulators)}.")
        if self.half_precision_forward not in ("split", "merged"):
            raise ValueError(
                f"half_precision_forward must be 'split' or 'merged', got {self.half_precision_forward!r}."
            )
        if not 0.0 <= float(self.hira_dropout) < 1.0:
            raise ValueError(f"hira_dropout must be in [0, 1), got {self.hira_dropout!r}.")

    @property
    def is_plain_hira(self) -> bool:
        return all(getattr(self, k) == v for k, v in _VARIANT_DEFAULTS.items()) and self._variant_fields_default()

    def _variant_fields_default(self) -> bool:
        """True when every variant-specific field holds its default (overridden by variant modules)."""
        return True

    def to_dict(self):
        d = super().to_dict()
        if self.is_plain_hira:
            # A plain-HiRA checkpoint is a stock-PEFT checkpoint: write the stock schema only.
            stock = {f.name for f in fields(_StockHiraConfig)}
            d = {k: v for k, v in d.items() if k in stock}
        return d
