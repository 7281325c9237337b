"""Decoder-layer indices in module names (``model.layers.3.mlp.down_proj`` -> 3).

The first component named like a block container (``layers``, ``h``, ``block``, ``blocks``, ``layer``; or the
config's ``layers_pattern``) followed by a number is the layer index; without one, the first numeric component.
Later numbers belong to modules inside the layer (mixture-of-experts ``experts.5``), never to the layer index.
"""

from __future__ import annotations

BLOCK_CONTAINERS = ("layers", "h", "block", "blocks", "layer")


def split_layer_index(name: str, layers_pattern=None) -> tuple[str, int, str] | None:
    """``(prefix, index, suffix)`` with ``name == f"{prefix}{index}{suffix}"``, or ``None`` without an index."""
    parts = name.split(".")
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or BLOCK_CONTAINERS)
    pos = next((i for i in range(1, len(parts)) if parts[i].isdigit() and parts[i - 1] in patterns), None)
    if pos is None and not layers_pattern:
        pos = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if pos is None:
        return None
    prefix = ".".join(parts[:pos]) + "." if pos else ""
    suffix = "." + ".".join(parts[pos + 1 :]) if pos + 1 < len(parts) else ""
    return prefix, int(parts[pos]), suffix


def layer_index(name: str, layers_pattern=None) -> int:
    """The decoder-layer index of a module name, -1 when it has none."""
    s = split_layer_index(name, layers_pattern)
    return -1 if s is None else s[1]

