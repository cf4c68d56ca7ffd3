"""Pytree key paths as readable names ('backbone/layer1_0/conv1/kernel'): the one helper
behind sharding rules, frozen-parameter masks, LayerNorm masks and ISAL parameter subsets."""
from __future__ import annotations

from typing import Any, Sequence


def key_name(k: Any) -> str:
    """One jax key-path entry (DictKey, GetAttrKey, SequenceKey, ...) -> its name."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_names(path: Sequence[Any]) -> list[str]:
    return [key_name(k) for k in path]


def path_str(path: Sequence[Any]) -> str:
    """jax key path -> 'Conv_0/kernel'."""
    return "/".join(key_name(k) for k in path)
