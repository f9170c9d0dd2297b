"""``TurboQuantKVCache``: a KV cache of rotated, quantized keys and values for mlx-lm.

Follows mlx-lm's cache interface (``mlx_lm/models/cache.py``): ``update_and_fetch``,
``offset``, ``state``/``meta_state``, ``from_state``, ``is_trimmable``/``trim``,
``make_mask``, ``nbytes``, ``empty``, ``size``; ``copy.deepcopy`` works.

Deliberately no ``bits`` attribute: mlx-lm's attention routes any cache with one into its
own affine path. ``update_and_fetch`` returns two :class:`PackedSide` views which only the
patched attention (patch.py -> attention.py) understands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from .config import TurboQuantConfig
from .quantizers import SideSpec, make_side_spec, num_parts, quantize
from .rotation import get_rotation, rotate


@dataclass(frozen=True, eq=False)
class PackedSide:
    """The stored keys or values of one layer, sliced to the cache's offset."""

    parts: tuple[mx.array, ...]
    spec: SideSpec
    dim: int
    use_rotation: bool
    seed: int
    # Keys only: the fixed vector subtracted before quantizing (rotated space). Adding
    # q·center to every score of a query changes no softmax, so attention ignores it.
    center: mx.array | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical ``(B, H_kv, T, D)`` of the vectors this side stands for."""
        b, h, t = self.parts[0].shape[:3]
        return (b, h, t, self.dim)

    @property
    def rotation(self):
        """The rotation the vectors were stored under (``None``: none)."""
        return get_rotation(self.dim, self.seed) if self.use_rotation else None


def _to_bool_str(v: bool) -> str:
    return "1" if v else "0"


class TurboQuantKVCache(_BaseCache):
    """Compressed KV cache of one softmax-attention layer (see docs/turboquant.md)."""

    step = 256
    # Defaults as class attributes: mlx-lm's from_state builds with __new__ (no __init__).
    keys: tuple[mx.array, ...] | None = None
    values: tuple[mx.array, ...] | None = None
    offset = 0
    key_bits = 4
    value_bits = 4
    group_size = 64
    quantizer = "affine"
    key_quantizer = "affine"  # resolved per side (a codebook side > 4 bits is affine)
    value_quantizer = "affine"
    requested_key_quantizer: str | None = None  # per-side choice; None: `quantizer`
    requested_value_quantizer: str | None = None
    use_rotation = True
    use_normalization = True
    seed = 0
    center_keys = True
    key_center: mx.array | None = None

    def __init__(self, config: TurboQuantConfig | None = None, **overrides: Any):
        """Build from a :class:`TurboQuantConfig` (fields may be overridden by keyword)."""
        cfg = config or TurboQuantConfig()
        known = {
            "key_bits",
            "value_bits",
            "group_size",
            "quantizer",
            "use_rotation",
            "use_normalization",
            "seed",
            "center_keys",
            "key_quantizer",
            "value_quantizer",
        }
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown TurboQuantKVCache options: {sorted(unknown)}")
        get = lambda k: overrides.get(k, getattr(cfg, k))  # noqa: E731
        self.key_bits = int(get("key_bits"))
        self.value_bits = int(get("value_bits"))
        self.group_size = int(get("group_size"))
        self.quantizer = str(get("quantizer"))
        self.use_rotation = bool(get("use_rotation"))
        self.use_normalization = bool(get("use_normalization"))
        self.seed = int(get("seed"))
        self.center_keys = bool(get("center_keys"))
        self.requested_key_quantizer = get("key_quantizer") or None
        self.requested_value_quantizer = get("value_quantizer") or None
        self._resolve()
        self.key_center = None
        self.keys = None
        self.values = None
        self.offset = 0

    def _resolve(self) -> None:
        # Validates the combination and records which quantizer each side really uses.
        self.key_quantizer = self._spec(self.key_bits, self.requested_key_quantizer).quantizer
        self.value_quantizer = self._spec(self.value_bits, self.requested_value_quantizer).quantizer

    def _spec(self, bits: int, requested: str | None) -> SideSpec:
        return make_side_spec(
            requested or self.quantizer, bits, self.group_size, self.use_normalization
        )

    # ------------------------------------------------------------------ specs per side

    def key_spec(self, dim: int) -> SideSpec:
        """Key-side spec resolved for head dim ``dim``."""
        return self._spec(self.key_bits, self.requested_key_quantizer).for_dim(dim)

    def value_spec(self, dim: int) -> SideSpec:
        """Value-side spec resolved for head dim ``dim``."""
        return self._spec(self.value_bits, self.requested_value_quantizer).for_dim(dim)

    def _dims(self) -> tuple[int, int]:
        return (
            self.keys[0].shape[-1] * 32 // self.key_bits,
            self.values[0].shape[-1] * 32 // self.value_bits,
        )

    def _rotate(self, x: mx.array) -> mx.array:
        if self.use_rotation:
            return rotate(x, get_rotation(x.shape[-1], self.seed))
        return x.astype(mx.float32)

    def _center(self, k_rot: mx.array) -> mx.array:
        # Fixed at the first store: changing it later would shift old and new scores
        # differently. Position 0 is left out (usually BOS, an outlier attention sink).
        if self.key_center is None:
            n = k_rot.shape[2]
            if n > 1:
                self.key_center = mx.mean(k_rot[:, :, 1:], axis=2, keepdims=True)
            else:
                self.key_center = mx.zeros((*k_rot.shape[:2], 1, k_rot.shape[-1]))
        return k_rot - self.key_center

    # ------------------------------------------------------------------ mlx-lm interface

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[PackedSide, PackedSide]:
        """Rotate, quantize and append ``(B, H_kv, L, D)`` keys/values; return packed views."""
        _check_patch_installed()
        B, n_kv, n_new, k_dim = keys.shape
        v_dim = values.shape[-1]
        k_rot = self._rotate(keys)
        if self.center_keys:
            k_rot = self._center(k_rot)
        k_new = quantize(k_rot, self.key_spec(k_dim))
        v_new = quantize(self._rotate(values), self.value_spec(v_dim))
        prev = self.offset
        if self.keys is None or prev + n_new > self.keys[0].shape[2]:
            self._grow(k_new, v_new, n_new)
        self.offset = prev + n_new
        for stored, new in ((self.keys, k_new), (self.values, v_new)):
            for arr, part in zip(stored, new, strict=True):
                arr[:, :, prev : self.offset, ...] = part
        return self._views()

    def _grow(self, k_new: tuple, v_new: tuple, n_new: int) -> None:
        # Same growth policy as mlx-lm's QuantizedKVCache: whole steps of 256 positions.
        new_steps = (self.step + n_new - 1) // self.step * self.step

        def zeros_like_steps(part: mx.array) -> mx.array:
            shape = (*part.shape[:2], new_steps, *part.shape[3:])
            return mx.zeros(shape, dtype=part.dtype)

        if self.keys is None:
            self.keys = tuple(zeros_like_steps(p) for p in k_new)
            self.values = tuple(zeros_like_steps(p) for p in v_new)
            return
        prev = self.offset

        def extend(old: mx.array) -> mx.array:
            if prev % self.step != 0:
                old = old[:, :, :prev, ...]
            return mx.concatenate([old, zeros_like_steps(old)], axis=2)

        self.keys = tuple(extend(p) for p in self.keys)
        self.values = tuple(extend(p) for p in self.values)

    def _sliced(self, side: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
        if self.offset == side[0].shape[2]:
            return side
        return tuple(p[:, :, : self.offset, ...] for p in side)

    def _views(self) -> tuple[PackedSide, PackedSide]:
        k_dim, v_dim = self._dims()
        return (
            PackedSide(
                self._sliced(self.keys),
                self.key_spec(k_dim),
                k_dim,
                self.use_rotation,
                self.seed,
                self.key_center,
            ),
            PackedSide(
                self._sliced(self.values),
                self.value_spec(v_dim),
                v_dim,
                self.use_rotation,
                self.seed,
            ),
        )

    def size(self) -> int:
        """Number of cached positions."""
        return self.offset

    @property
    def state(self) -> tuple[mx.array, ...] | list:
        """Stored arrays sliced to ``offset``: key parts, value parts, [key center]."""
        if self.keys is None:
            return []
        center = () if self.key_center is None else (self.key_center,)
        return (*self._sliced(self.keys), *self._sliced(self.values), *center)

    @state.setter
    def state(self, v) -> None:
        if v is None or len(v) == 0:
            self.keys = self.values = None
            self.offset = 0
            return

        # An affine side is (packed, scales, biases), a codebook side (packed, norms):
        # norms have one axis less than packed, scales the same number of axes.
        def side_len(i: int) -> int:
            return 3 if v[i + 1].ndim == v[i].ndim else 2

        try:
            n_key = side_len(0)
            n_val = side_len(n_key)
        except IndexError as exc:
            raise ValueError(f"not a TurboQuantKVCache state ({len(v)} arrays)") from exc
        rest = v[n_key + n_val :]
        if len(rest) > 1:
            raise ValueError(f"not a TurboQuantKVCache state ({len(v)} arrays)")
        self.keys, self.values = tuple(v[:n_key]), tuple(v[n_key : n_key + n_val])
        self.key_center = rest[0] if rest else None
        self.offset = self.keys[0].shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        """Configuration as strings (mlx-lm's convention)."""
        return (
            self.quantizer,
            str(self.key_bits),
            str(self.value_bits),
            str(self.group_size),
            _to_bool_str(self.use_rotation),
            _to_bool_str(self.use_normalization),
            str(self.seed),
            str(self.offset),
            _to_bool_str(self.center_keys),
            self.requested_key_quantizer or "",
            self.requested_value_quantizer or "",
        )

    @meta_state.setter
    def meta_state(self, v) -> None:
        quantizer, kb, vb, gs, rot, norm, seed, offset, center, kq, vq = v
        self.center_keys = center == "1"
        self.requested_key_quantizer = kq or None
        self.requested_value_quantizer = vq or None
        self.quantizer = quantizer
        self.key_bits, self.value_bits, self.group_size = int(kb), int(vb), int(gs)
        self.use_rotation, self.use_normalization = rot == "1", norm == "1"
        self.seed, self.offset = int(seed), int(offset)
        self._resolve()
        if self.keys is not None:
            expect = (
                num_parts(self._spec(self.key_bits, self.requested_key_quantizer)),
                num_parts(self._spec(self.value_bits, self.requested_value_quantizer)),
            )
            if (len(self.keys), len(self.values)) != expect:
                raise ValueError("state does not match meta_state's quantizers")

    @classmethod
    def from_state(cls, state, meta_state=None) -> TurboQuantKVCache:
        """Rebuild without ``__init__`` (state first, then the string meta state)."""
        obj = cls.__new__(cls)
        obj.state = state
        if meta_state is not None:
            obj.meta_state = meta_state
        return obj

    def is_trimmable(self) -> bool:
        """Always: trimming only moves ``offset`` back."""
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """The attention mask for the next ``N`` queries (mlx-lm's helper)."""
        return create_attention_mask(
            N, offset=self.offset, return_array=return_array, window_size=window_size
        )

    def empty(self) -> bool:
        """True until something was stored (``state`` empty)."""
        return self.keys is None

    @property
    def nbytes(self) -> int:
        """Bytes allocated (whole steps), as mlx-lm's caches report it."""
        if self.keys is None:
            return 0
        return sum(p.nbytes for p in (*self.keys, *self.values)) + self._center_nbytes()

    def _center_nbytes(self) -> int:
        return 0 if self.key_center is None else self.key_center.nbytes

    @property
    def used_nbytes(self) -> int:
        """Bytes holding the ``offset`` stored positions."""
        if self.keys is None:
            return 0
        parts = (*self.keys, *self.values)
        return sum(p.nbytes * self.offset // p.shape[2] for p in parts) + self._center_nbytes()

    @property
    def fp16_nbytes(self) -> int:
        """What an fp16 ``KVCache`` would hold for the same ``offset`` positions."""
        if self.keys is None:
            return 0
        B, H = self.keys[0].shape[:2]
        k_dim, v_dim = self._dims()
        return B * H * self.offset * (k_dim + v_dim) * 2

    def effective_bits(self) -> float:
        """Stored bits per cached element (keys and values together); needs data."""
        if self.keys is None or self.offset == 0:
            raise ValueError("cache is empty")
        return 16.0 * self.used_nbytes / self.fp16_nbytes

    def __repr__(self) -> str:
        return (
            f"TurboQuantKVCache(quantizer={self.quantizer!r}, key_bits={self.key_bits}, "
            f"value_bits={self.value_bits}, group_size={self.group_size}, "
            f"offset={self.offset})"
        )

    @classmethod
    def from_kv_cache(
        cls, kv_cache: Any, config: TurboQuantConfig | None = None, **overrides: Any
    ) -> TurboQuantKVCache:
        """Quantize a filled mlx-lm ``KVCache`` once (prefill in full precision, then this)."""
        obj = cls(config, **overrides)
        if kv_cache.keys is not None and kv_cache.offset > 0:
            k = kv_cache.keys[:, :, : kv_cache.offset, :]
            v = kv_cache.values[:, :, : kv_cache.offset, :]
            obj.update_and_fetch(k, v)
        return obj


def _check_patch_installed() -> None:
    from . import patch

    if not patch.is_installed():
        raise RuntimeError(
            "TurboQuantKVCache needs the attention patch: call "
            "services.turboquant.install_patch() (make_turboquant_cache does it)"
        )
