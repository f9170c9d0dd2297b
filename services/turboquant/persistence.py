"""Save and load prompt caches that mix our cache with mlx-lm's caches (safetensors).

mlx-lm's ``load_prompt_cache`` looks cache classes up by name in its own module, so it
cannot rebuild a :class:`TurboQuantKVCache`. Here every entry records its class, and our
caches also their ``meta_state``; mlx-lm caches are rebuilt with their own ``from_state``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache

from .cache import TurboQuantKVCache

FORMAT = "tqstack-prompt-cache/2"  # /2: head, tail and body segments
_OURS = "TurboQuantKVCache"


def _encode_leaf(value: Any) -> tuple[str, mx.array | None]:
    if isinstance(value, mx.array):
        return "array", value
    if value is None:
        return "none", None
    if isinstance(value, bool):
        return "bool", mx.array(int(value))
    if isinstance(value, int):
        return "int", mx.array(value)
    if isinstance(value, float):
        return "float", mx.array(value)
    raise ValueError(f"cache state is not serializable: {type(value).__name__}")


def _decode_leaf(kind: str, arr: mx.array | None) -> Any:
    if kind == "array":
        return arr
    if kind == "none":
        return None
    return {
        "bool": lambda a: bool(a.item()),
        "int": lambda a: int(a.item()),
        "float": lambda a: float(a.item()),
    }[kind](arr)


def save_turboquant_cache(
    path: str | Path, caches: list[Any], metadata: dict[str, str] | None = None
) -> None:
    """Write ``caches`` (ours and mlx-lm's, any mix) and string ``metadata`` to ``path``."""
    arrays: dict[str, mx.array] = {}
    entries = []
    for i, c in enumerate(caches):
        name = type(c).__name__
        if not isinstance(c, TurboQuantKVCache) and getattr(mlx_cache, name, None) is not type(c):
            raise ValueError(f"cannot save cache entry {i} of type {name}")
        state = list(c.state) if isinstance(c.state, (list, tuple)) else [c.state]
        leaves = tree_flatten(state)
        kinds = {}
        for key, value in leaves:
            kind, arr = _encode_leaf(value)
            kinds[key] = kind
            if arr is not None:
                arrays[f"{i}.{key}"] = arr
        entry = {
            "class": name,
            "leaves": kinds,
            "n": len(state),
            "tuple": isinstance(c.state, tuple),
        }
        if isinstance(c, TurboQuantKVCache):
            entry["meta_state"] = list(c.meta_state)
        entries.append(entry)
    meta = {"format": FORMAT, "caches": json.dumps(entries)}
    for k, v in (metadata or {}).items():
        meta[f"user.{k}"] = str(v)
    mx.save_safetensors(str(path), arrays, meta)


def load_turboquant_cache(path: str | Path, return_metadata: bool = False):
    """Read a file written by :func:`save_turboquant_cache`.

    Returns the cache list, or ``(caches, metadata)`` with ``return_metadata=True``.
    """
    arrays, meta = mx.load(str(path), return_metadata=True)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tqstack prompt cache (format {meta.get('format')!r})")
    caches = []
    for i, entry in enumerate(json.loads(meta["caches"])):
        leaves = [
            (key, _decode_leaf(kind, arrays.get(f"{i}.{key}")))
            for key, kind in entry["leaves"].items()
        ]
        state = tree_unflatten(leaves) if leaves else []
        if isinstance(state, dict):  # tree_unflatten of "0", "1", ... keys gives a list
            state = [state[str(k)] for k in range(len(state))]
        state = list(state) + [None] * (entry["n"] - len(state))
        if entry.get("tuple"):
            state = tuple(state)
        if entry["class"] == _OURS:
            caches.append(TurboQuantKVCache.from_state(state, tuple(entry["meta_state"])))
        else:
            cls = getattr(mlx_cache, entry["class"])
            caches.append(cls.from_state(state))
    user = {k[5:]: v for k, v in meta.items() if k.startswith("user.")}
    return (caches, user) if return_metadata else caches
