"""The only module that touches DeepSpeed ZeRO-3 parameter state (``ds_id``, ``ds_status``, partitioning).

HiRA reads the full base weight W0 wherever it forms ``W0 ⊙ M``, and ZeRO-3 partitions W0 and the adapter factors
across ranks. Inside a module's forward DeepSpeed (0.19) fetches a partitioned parameter when it is accessed, but
not elsewhere: merging, unmerging, analysis, initialisations that read W0, and any call that bypasses the module
hooks see empty partitions. :func:`gather` therefore gathers, for the duration of a block, the parameters that are
partitioned at that moment and leaves alone those DeepSpeed has already fetched (freeing them here would break its
bookkeeping).

``gathered`` counts the parameters this module gathered, by site, so tests can show that a path really went through
the tuner's own gathering rather than DeepSpeed's.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable



gathered: Counter = Counter()  # site -> number of parameters gathered by hira (diagnostics and tests)

# ZeroParamStatus / GatheredParameters / ds_* attributes as used here; tested in CI with deepspeed 0.19.8.
SUPPORTED_DEEPSPEED = ("0.14", "0.20")  # [low, high)
_checked = False


def _check_deepspeed_version() -> None:
    global _checked
    if _checked:
        return
    import deepspeed
    from packaging.version import Version

    low, high = map(Version, SUPPORTED_DEEPSPEED)
    if not low <= Version(deepspeed.__version__) < high:
        raise ImportError(
            f"hira's ZeRO-3 support reads DeepSpeed parameter state tested with deepspeed>={low},<{high}; found "
            f"deepspeed {deepspeed.__version__}. Install a tested version: pip install deepspeed==0.19.8"
        )
    _checked = True


def is_partitioned_param(p) -> bool:
    """A ZeRO-3 managed parameter (partitioned or temporarily gathered)."""
    return p is not None and hasattr(p, "ds_id")


def any_partitioned(params: Iterable) -> bool:
    return any(is_partitioned_param(p) for p in params)


def _not_available(params):
    _check_deepspeed_version()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if is_partitioned_param(p) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]


def gather(params: Iterable, modify: bool = False, site: str = "read"):
    """Context manager: the ZeRO-3 partitioned ``params`` are whole inside the block (no-op without ZeRO-3).

    ``modify=True`` makes rank 0's in-place changes (merge/unmerge) the ones every rank keeps on exit."""
    params = [p for p in params if p is not None]
    if not any_partitioned(params):
        return contextlib.nullcontext()
    missing = _not_available(params)
    if not missing:
        return contextlib.nullcontext()
    import deepspeed

    gathered[site] += len(missing)
    return deepspeed.zero.GatheredParameters(missing, modifier_rank=0 if modify else None)


def write(params: list, values: list) -> None:
    """Set (possibly partitioned) parameters to ``values`` (their full shapes) on every rank, in one gather. Under
    ZeRO-3 the gathered tensors are written with rank 0 as the modifier, and a trainable parameter's fp32 master
    partition in the ZeRO-3 optimizer (if one exists yet) too, so the next optimizer step starts from the written
    value."""
    import torch

    with gather(params, modify=True, site="write"), torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.data.copy_(v.to(device=p.device, dtype=p.dtype))
    for p, v in zip(params, values, strict=True):
        if is_partitioned_param(p) and p.requires_grad and getattr(p, "_z3_optimizer", None) is not None:
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(p, v.to(torch.float32))


def release(params: Iterable) -> None:
    """Re-partition ZeRO-3 params left gathered by a pass run outside the engine's forward/backward (e.g. the
    HiRA-SB gradient estimate), so later writes through :func:`gather` (``modify=True``) reach every partition."""
    params = [p for p in params if is_partitioned_param(p)]
    if not params:
        return
    _check_deepspeed_version()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for p in params:
        if p.ds_status == ZeroParamStatus.AVAILABLE:
            p.ds_active_sub_modules.clear()
            p.partition()
