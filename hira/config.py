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
from typing import Literal, Optional

from ._peft_compat import PeftType
from ._peft_compat import StockHiraConfig as _StockHiraConfig


class HiraFamilyType(str, enum.Enum):
    """PEFT type of checkpoints that only this package can load (variants of HiRA)."""

    HIRA_FAMILY = "HIRA_FAMILY"


# Fields whose non-default value changes the adapter's math (they make a checkpoint a "family" checkpoint).
_VARIANT_DEFAULTS: dict[str, object] = {"variant": "hira", "modulator": "weight"}


@dataclass
class HiraConfig(_StockHiraConfig):
    """Configuration of a HiRA-family adapter: ``W' = W0 + R ⊙ M``; plain HiRA is ``R = W0``, ``M = B·A``.

    All stock ``peft.HiraConfig`` fields (``r``, ``target_modules``, ``hira_dropout``, ``init_weights``, ...) keep
    their meaning. Extra fields:

    Args:
        variant: ``"hira"`` (default), ``"hilora"``, ``"bhra"`` or ``"sb"``; see :mod:`hira.variants` and
            docs/variants.md. The ``hilora_*``, ``bhra_*``, ``sb_*`` fields configure them.
        modulator: the fixed matrix R of ``ΔW = R ⊙ (B·A)``; ``"weight"`` (W0, the paper's HiRA) by default, or
            ``"random"`` (``modulator_seed``), ``"lowrank"`` (``modulator_rank``), ``"smooth"``.
        fused: use the fused one-GEMM path (:mod:`hira.functional`). ``False`` computes the dense formula with plain
            autograd (stock-PEFT-like memory); useful for debugging.
        half_precision_forward: ``"merged"`` (default) or ``"split"``: the forward in bf16/fp16; see
            :mod:`hira.functional`. Full-precision (fp32/fp64) compute always uses the exact one-GEMM forward.
    """

    variant: Literal["hira", "hilora", "bhra", "sb"] = field(
        default="hira", metadata={"help": "Member of the HiRA family: hira, hilora, bhra, sb (see docs/variants.md)."}
    )
    modulator: Literal["weight", "random", "lowrank", "smooth"] = field(
        default="weight",
        metadata={"help": "Fixed modulator R in ΔW = R ⊙ (B·A): weight (W0), random, lowrank, smooth."},
    )
    # ---- HiRA-family variant options (hira/variants.py, hira/sb.py); each only applies to its variant/modulator.
    hilora_r2: int = field(default=0, metadata={"help": "HiLoRA: rank r2 of the additive LoRA part (r1 = r - r2)."})
    hilora_alpha: Optional[float] = field(
        default=None, metadata={"help": "HiLoRA: LoRA part scaled by hilora_alpha/r2 (LoRA convention); None: scale 1."}
    )
    bhra_blocks: int = field(default=1, metadata={"help": "BHRA: k of the k×k block grid (rank r/k per block)."})
    modulator_seed: int = field(default=0, metadata={"help": "random modulator: seed of the hashed uniform [0,1)."})
    modulator_rank: int = field(default=8, metadata={"help": "lowrank modulator: rank v of W0's truncated SVD."})
    sb_target: Literal["grad_over_weight", "grad", "grad_times_weight"] = field(
        default="grad_times_weight",
        metadata={"help": "HiRA-SB: matrix whose truncated SVD gives B, A: W0⊙G (default), G⊘W0 or G (G: full-FT grad)."},
    )
    sb_init_step: float = field(
        default=0.0,
        metadata={"help": "HiRA-SB: 0 starts as a no-op (S=0); >0 applies the projected full-FT step -η·G at init."},
    )
    sb_eps: float = field(
        default=0.05, metadata={"help": "HiRA-SB: |W0| floor, relative to mean|W0|, guarding the division G⊘W0."}
    )
    fused: bool = field(default=True, metadata={"help": "Use the fused, memory-lean autograd path."})
    half_precision_forward: Literal["split", "merged"] = field(
        default="merged",
        metadata={
            "help": "bf16/fp16 forward: 'merged' (default; the HiRA authors' numerics) is one GEMM on W0⊙(1+BA) "
            "rounded to half precision (merged-weight precision); 'split' keeps the update at half-precision "
            "relative resolution like stock PEFT (one more GEMM)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.refresh()

    def refresh(self) -> None:
        """Validate the fields and derive ``peft_type`` from them. Runs at construction, when the tuner injects the
        adapter and when the config is saved, so a field edited after construction (``cfg.modulator = "random"``)
        is checked and saved as what it is (``HIRA_FAMILY``), never as plain HiRA."""
        self._validate_family()
        self.peft_type = PeftType.HIRA if self.is_plain_hira else HiraFamilyType.HIRA_FAMILY

    def _validate_family(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"HiRA rank r must be a positive integer, got r={self.r!r}. Use e.g. r=32.")
        for name, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{name!r}] must be a positive integer, got {rank!r}.")
        if self.half_precision_forward not in ("split", "merged"):
            raise ValueError(
                f"half_precision_forward must be 'split' or 'merged', got {self.half_precision_forward!r}."
            )
        if not 0.0 <= float(self.hira_dropout) < 1.0:
            raise ValueError(f"hira_dropout must be in [0, 1), got {self.hira_dropout!r}.")
        from .variants import validate_config  # HiRA-family variant checks

        validate_config(self)

    @property
    def is_plain_hira(self) -> bool:
        return all(getattr(self, k) == v for k, v in _VARIANT_DEFAULTS.items()) and self._variant_fields_default()

    def _variant_fields_default(self) -> bool:
        """True when every variant-specific field holds its default."""
        from .variants import variant_fields_default

        return variant_fields_default(self)

    def to_dict(self):
        self.refresh()
        d = super().to_dict()
        if self.is_plain_hira:
            # A plain-HiRA checkpoint is a stock-PEFT checkpoint: write the stock schema only.
            stock = {f.name for f in fields(_StockHiraConfig)}
            d = {k: v for k, v in d.items() if k in stock}
        return d
