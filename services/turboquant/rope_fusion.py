"""A decode step's RoPE left to the CUDA layer kernel: two MLX ops a layer fewer.

mlx-lm's attention layers rotate the step's query and key by position
(``self.rope(x, offset=cache.offset)``), then call ``cache.update_and_fetch`` and the shared
SDPA. On CUDA the layer kernel already reads that query and writes that key into the tail
buffer (cache.TailAppend), so it can apply the rotation itself: a Llama-3.1-8B step is
host-bound at batch 1 on the H200's host, where a rope op costs ~3 us of build and ~3-5 of
encode a layer (bench/gpu_notes.md, session 18: a step alone costs the host less; end to
end at parity within that host's noise).

How it is wired: :func:`defer_rope` wraps the ``rope`` of every attention layer whose
source follows mlx-lm's pattern (``queries = self.rope(queries, offset=cache.offset)``, the
same for the keys, ``cache.update_and_fetch``, the SDPA). Reading our cache's ``offset``
notes the cache; the wrapper returns a :class:`PendingRope` (the unrotated ``x``, the rope,
the position) instead of calling the rope when its ``offset`` is that cache's own int
object (past SMALL_INTS), the call is one decode position and the cache will hand the step
to the kernel (decided once a step, by the query's call). A stale note (an int of another
cache) fails the identity test and the rope runs as before.
Every other reader gets the rotated array from :meth:`PendingRope.array` -- the original
rope module's own output. (``offset`` stays a plain int: MLX functions reject subclasses.)
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class RopeSpec:
    """What the kernel needs of a rope: rotated dims (pairs ``(i, i + dims/2)``, or
    ``(2i, 2i + 1)`` when ``traditional``) and each pair's angle a position (the rope's
    position scale folded in), float32 as MLX computes it."""

    dims: int
    traditional: bool
    inv_freq: tuple[float, ...]


def rope_spec(rope: Any) -> RopeSpec | None:
    """The :class:`RopeSpec` of mlx's ``nn.RoPE`` or mlx-lm's ``Llama3RoPE``; None for any
    other rope (scaled magnitudes, dynamic bases: those keep their MLX op)."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    dims = getattr(rope, "dims", None)
    if (
        type(rope) not in (nn.RoPE, Llama3RoPE)
        or not isinstance(dims, int)
        or dims <= 0
        or dims % 2
    ):
        return None
    half = mx.arange(0, dims, 2, dtype=mx.float32)
    if type(rope) is nn.RoPE:
        # mx.fast.rope: theta = scale * position * base^(-2i / dims)
        inv = float(rope.scale) * mx.power(float(rope.base), -half / dims)
    else:
        inv = 1.0 / rope._freqs.astype(mx.float32)  # Llama3RoPE's freqs: periods, scale 1.0
    values = tuple(float(x) for x in inv.astype(mx.float32).tolist())
    if not all(math.isfinite(x) for x in values):
        return None
    return RopeSpec(dims, bool(rope.traditional), values)


# A weak reference to the TurboQuant cache whose ``offset`` was read last: a rope handed
# ``offset=cache.offset`` gets that very int object, so a deferring rope knows whose step it
# is by identity. Past SMALL_INTS only: CPython shares smaller ints.
_last_read: Any = None
SMALL_INTS = 256


class PendingRope:
    """``rope(x, offset)`` not yet computed: the layer kernel takes ``x`` and rotates it at
    ``offset``; :meth:`array` computes it with the rope's MLX op for any other reader."""

    __slots__ = ("x", "rope", "offset", "shape", "dtype", "spec", "_done")

    def __init__(self, x: mx.array, rope: DeferringRope, offset: int):
        self.x, self.rope, self.offset, self._done = x, rope, offset, None
        # (read several times a layer: an MLX shape is a new tuple each time)
        self.shape, self.dtype, self.spec = x.shape, x.dtype, rope._spec

    def array(self) -> mx.array:
        if self._done is None:
            self._done = self.rope.inner(self.x, offset=int(self.offset))
        return self._done


def as_array(x: Any) -> Any:
    """``x`` rotated if it is a :class:`PendingRope`, else ``x``."""
    return x.array() if type(x) is PendingRope else x


# Set by attention.set_layer_decode_kernel: the installed layer kernel takes a PendingRope.
_kernel_takes_rope = False
# TQ_FUSE_ROPE (the sidecar sets it at load): patch.ensure_patched wraps ropes only while on.
ENABLED = True


def set_enabled(flag: bool) -> None:
    global ENABLED
    ENABLED = bool(flag)


def set_kernel_takes_rope(flag: bool) -> None:
    global _kernel_takes_rope
    _kernel_takes_rope = bool(flag)


def kernel_takes_rope() -> bool:
    return _kernel_takes_rope


class DeferringRope(nn.Module):
    """A layer's rope that defers a decode step's rotation to the layer kernel."""

    def __init__(self, inner: nn.Module, spec: RopeSpec):
        super().__init__()
        self._inner, self._spec = inner, spec  # (underscored: no child, no parameter)

    @property
    def inner(self) -> nn.Module:
        return self._inner

    @property
    def spec(self) -> RopeSpec:
        return self._spec

    def __call__(self, x, offset=0):
        cache = _last_read() if _last_read is not None else None
        if cache is not None and offset is cache._offset and _kernel_takes_rope:
            # Decided once a step (the query's call; the key's reads it): host time a layer.
            step = cache._rope_step
            if step is None or step[0] is not offset:
                takes = (
                    offset > SMALL_INTS
                    and x.shape[2] == 1
                    and cache.defers_rope(x.dtype, self._spec.dims, x.shape[3])
                )
                step = cache._rope_step = (offset, takes)
            if step[1]:
                return PendingRope(x, self, offset)
        return self._inner(x, offset=offset)


# The lines mlx-lm's attention layers rotate, store and attend with (67 model files of
# mlx-lm 0.32): the wrapper is only put where the pending values go nowhere else.
_PATTERN = re.compile(
    r"queries = self\.rope\(queries, offset=cache\.offset\)\s*\n\s*"
    r"keys = self\.rope\(keys, offset=cache\.offset\)\s*\n\s*"
    r"keys, values = cache\.update_and_fetch\(keys, values\)"
)
_NO_CACHE_ROPE = re.compile(r"queries = self\.rope\(queries\)")
_SDPA_QUERIES = re.compile(r"scaled_dot_product_attention\(\s*queries\s*,")


@lru_cache(maxsize=256)
def follows_pattern(cls: type) -> bool:
    """Whether ``cls.__call__`` rotates its query and key by ``cache.offset``, stores them,
    and reads the query again only as the shared SDPA's first argument. Cached: every cache
    made for a model asks again (patch.ensure_patched), and reading source takes ~ms."""
    call = cls.__dict__.get("__call__")
    if call is None:
        return False
    try:
        src = inspect.getsource(call)
    except (OSError, TypeError):
        return False
    m = _PATTERN.search(src)
    if m is None:
        return False
    rest = _NO_CACHE_ROPE.sub("", src[m.end() :])
    return rest.count("queries") == len(_SDPA_QUERIES.findall(rest)) == 1


def defer_rope(model: Any) -> int:
    """Wrap the rope of every attention layer of ``model`` that :func:`follows_pattern` and
    has a :func:`rope_spec`; returns how many are wrapped (idempotent)."""
    wrapped = 0
    for m in model.modules():
        rope = getattr(m, "rope", None) if isinstance(m, nn.Module) else None
        if isinstance(rope, DeferringRope):
            wrapped += 1
            continue
        if rope is None or not follows_pattern(type(m)):
            continue
        spec = rope_spec(rope)
        if spec is not None:
            m.rope = DeferringRope(rope, spec)
            wrapped += 1
    return wrapped


def restore_rope(model: Any) -> int:
    """Undo :func:`defer_rope`; returns how many layers got their rope back."""
    n = 0
    for m in model.modules():
        rope = getattr(m, "rope", None) if isinstance(m, nn.Module) else None
        if isinstance(rope, DeferringRope):
            m.rope = rope.inner
            n += 1
    return n
