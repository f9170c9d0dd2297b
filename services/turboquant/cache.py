"""``TurboQuantKVCache``: a KV cache of rotated, quantized keys and values for mlx-lm.

Follows mlx-lm's cache interface (``mlx_lm/models/cache.py``): ``update_and_fetch``,
``offset``, ``state``/``meta_state``, ``from_state``, ``is_trimmable``/``trim``,
``make_mask``, ``nbytes``, ``empty``, ``size``; ``copy.deepcopy`` works.

Deliberately no ``bits`` attribute: mlx-lm's attention routes any cache with one into its
own affine path. ``update_and_fetch`` returns two :class:`PackedSide` views which only the
patched attention (patch.py -> attention.py) understands.
"""

from __future__ import annotations

import copy
import sys
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from . import rope_fusion
from .config import TurboQuantConfig
from .quantizers import (
    KEY_ONLY_QUANTIZERS,
    SideSpec,
    dequantize,
    empty_parts,
    make_side_spec,
    num_parts,
    quantize,
)
from .rope_fusion import PendingRope, as_array
from .rotation import get_rotation, rotate, unrotate


@dataclass(frozen=True, eq=False)
class PackedSide:
    """The stored keys or values of one layer at the cache's offset, in position order.

    ``head`` (the attention-sink positions) and ``tail`` (the most recent positions) are
    full precision, unrotated, in the model's dtype; ``parts`` is the quantized body
    between them, rotated, ``body_len`` positions (layout per ``spec``: per-vector
    ``(B, H, T, ..)``, or transposed ``(B, H, D, ..)`` for per-channel keys).
    """

    parts: tuple[mx.array, ...]
    spec: SideSpec
    dim: int
    use_rotation: bool
    seed: int
    # Keys only: the fixed vector subtracted before quantizing (rotated space). Adding
    # q·center to every score of a query changes no softmax, so attention ignores it.
    center: mx.array | None = None
    head: mx.array | None = None
    tail: mx.array | None = None
    body_len: int | None = None
    # Keys only, on CUDA: this layer's scratch for the fused decode kernel (its counters and
    # partials: JoinWorkspace), never shared with another layer or cache.
    workspace: JoinWorkspace | None = None
    # Keys only: the newest positions, which the tail's last rows do not hold yet (the CUDA
    # layer kernel writes them as it reads them: :class:`TailAppend`); None: all written.
    append: TailAppend | None = None
    # Not a field: (tail buffer, the tail's length) where the tail is cut only when read
    # (:class:`BufferedTail`); the CUDA layer kernel takes the buffer and the length.
    tail_buf = None

    @classmethod
    def made(cls, parts, spec, dim, use_rotation, seed, center, head, tail, body_len, workspace,
             append=None):  # fmt: skip
        """``cls(...)`` with every field (:meth:`with_tail`)."""
        fields = dict(parts=parts, spec=spec, dim=dim, use_rotation=use_rotation, seed=seed,
                      center=center, head=head, body_len=body_len, workspace=workspace)  # fmt: skip
        return cls.with_tail(fields, tail, append)

    @classmethod
    def with_tail(cls, fields: dict, tail: mx.array | None, append: TailAppend | None = None):
        """A side of ``fields`` (every other field, by name), ``tail`` and ``append``, set
        without the frozen dataclass's ``object.__setattr__`` per field: the cache makes two a
        layer every decode step, 1.1 -> 0.4 us each on this CPU (bench/gpu_notes.md, session 11)."""
        obj = object.__new__(cls)
        d = obj.__dict__
        d.update(fields)
        d["tail"] = tail
        d["append"] = append
        return obj

    def other_fields(self) -> dict:
        """Every field but the tail's (``tail``, ``append`` and a buffered tail's own)."""
        return {k: v for k, v in self.__dict__.items() if k not in _TAIL_FIELDS}

    @property
    def n_body(self) -> int:
        """Positions in the quantized body."""
        if self.body_len is not None:
            return self.body_len
        return body_positions(self.parts, self.spec)

    @property
    def body_only(self) -> bool:
        """Only a quantized body, no full-precision head or tail (what the kernels take)."""
        return _len(self.head) == 0 and _len(self.tail) == 0 and not self.spec.per_channel

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical ``(B, H_kv, T, D)`` of the vectors this side stands for."""
        b, h = self.parts[0].shape[:2]
        return (b, h, _len(self.head) + self.n_body + _len(self.tail), self.dim)

    @property
    def rotation(self):
        """The rotation the vectors were stored under (``None``: none)."""
        return get_rotation(self.dim, self.seed) if self.use_rotation else None


_TAIL_FIELDS = ("tail", "append", "tail_buf", "_cut", "fields")


class BufferedTail(PackedSide):
    """A side whose tail is the first ``tail_buf[1]`` positions of the tail buffer
    ``tail_buf[0]``: the cache makes two a layer every decode step, and cutting the tail
    (two slice ops: 3-8 us of build a layer inside the model on the H200's host, and their
    encode; bench/gpu_notes.md, session 17) is left to a reader that asks for ``tail``; the
    CUDA layer kernel takes the buffer and the length instead. Made by the cache's
    ``_copied_views`` only, with ``fields`` -- the dict its other fields were copied from, the
    same for every step between blocks: a reader that finds the very dict it saw last knows
    every other field is the same without reading them (mma_decode's
    ``steady_decode_layer``)."""

    @property
    def tail(self) -> mx.array:
        d = self.__dict__
        cut = d.get("_cut")
        if cut is None:
            buf, length = d["tail_buf"]
            cut = d["_cut"] = buf[:, :, :length]
        return cut

    @tail.setter
    def tail(self, x: mx.array) -> None:  # (dataclasses.replace: a side with this tail, cut)
        self.__dict__["_cut"] = x


class TailAppend:
    """Positions a decode step appended to the tail that no op has written yet.

    On CUDA the layer kernel takes them (``k``, ``v``: ``(B, H_kv, n, D)``) beside the tail
    view, which already counts them, reads them from there and writes them into the tail's
    buffer in place -- as FlashAttention's ``flash_attn_with_kvcache`` appends -- instead of
    two MLX slice updates a layer (~1.5 ms a step for Llama-3.1-8B on the H200's host:
    bench/gpu_notes.md, session 14). ``writer``: the output of the launch that took them (the
    write happens when it runs); ``after``: the previous such launch of this layer, which
    wrote what this step's tail reads (the kernel takes it as an input: it runs first). Every
    other reader of the tail settles them first (:meth:`TurboQuantKVCache._settle`). ``k``
    may be a :class:`PendingRope`: the kernel rotates it as it writes it; MLX writers take
    its array.
    """

    __slots__ = ("k", "v", "at", "after", "writer")

    def __init__(self, k: mx.array, v: mx.array, at: int, after: mx.array | None):
        self.k, self.v, self.at, self.after = k, v, at, after
        self.writer: mx.array | None = None

    def written(self, keys: PackedSide, values: PackedSide) -> tuple[PackedSide, PackedSide]:
        """``keys`` and ``values`` (the sides that carry these positions) with them in their
        tails, for a reader other than the kernel; the cache writes them into its buffer at
        its next step (or settle), whatever it has done since these sides were cut."""
        n = self.k.shape[2]
        out = []
        for side, new in ((keys, as_array(self.k)), (values, self.v)):
            tail = mx.concatenate([side.tail[:, :, : side.tail.shape[2] - n], new], axis=2)
            out.append(PackedSide.with_tail(side.other_fields(), tail))
        return out[0], out[1]


_new, _set = object.__new__, object.__setattr__  # (a frozen dataclass's own setattr: a frame)


def _len(x: mx.array | None) -> int:
    return 0 if x is None else x.shape[2]


def body_positions(parts: tuple[mx.array, ...], spec: SideSpec) -> int:
    """How many positions a stored body holds (also with a GQA axis inserted)."""
    if spec.per_channel:
        return parts[1].shape[-1] * spec.group_size
    return parts[0].shape[-2]


def _to_bool_str(v: bool) -> str:
    return "1" if v else "0"


class _TailSide:
    """``TurboQuantKVCache.tail_k`` / ``tail_v``: the views last cut, cut first if the tail is
    the buffer's first ``_tail_uncut`` positions; setting one ends that (the caller sets both)."""

    def __init__(self, attr: str):
        self.attr = attr

    def __get__(self, cache, owner=None):
        if cache is None:
            return self
        if cache._tail_uncut is not None:
            cache._cut_tail(cache._tail_buf, cache._tail_uncut)
        return getattr(cache, self.attr)

    def __set__(self, cache, x: mx.array | None) -> None:
        setattr(cache, self.attr, x)
        cache._tail_uncut = None
        cache._armed = None  # (the buffer tuple may stay: it no longer holds the tail)


class TurboQuantKVCache(_BaseCache):
    """Compressed KV cache of one softmax-attention layer (see docs/turboquant.md).

    Positions live in three segments, in order: the first ``sink_tokens`` in full
    precision (attention sinks), the quantized body, and a full-precision tail of the most
    recent positions. The tail is quantized into the body once it holds ``window`` plus one
    block (``group_size`` positions for per-channel keys, else one) positions.
    """

    step = 256
    CENTER_POSITIONS = 64  # positions the key centre is the mean of
    # Appends of at most this many positions (decode steps, small drafts) go into a
    # preallocated tail buffer: one in-place update per side instead of a concatenate
    # that copies the whole tail (two kernel launches on a GPU) every step. 0: off.
    TAIL_APPEND_MAX = 16
    # Defaults as class attributes: mlx-lm's from_state builds with __new__ (no __init__).
    keys: tuple[mx.array, ...] | None = None
    values: tuple[mx.array, ...] | None = None
    head_k: mx.array | None = None
    head_v: mx.array | None = None
    # The tail (tail_k / tail_v): the views last cut, or -- _tail_uncut set -- the tail
    # buffer's first _tail_uncut positions, cut when read (a decode step hands the kernel
    # the buffer instead: BufferedTail).
    _tail_k: mx.array | None = None
    _tail_v: mx.array | None = None
    _tail_uncut: int | None = None
    body_len = 0
    _offset = 0
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
    sink_tokens = 0
    window = 0
    key_center: mx.array | None = None
    # (keys buffer, values buffer, the tail_k view of it last written, that view's length,
    # the buffers' length): valid only while tail_k is still that view -- any other path
    # that replaces the tail retires it.
    _tail_buf: tuple[mx.array, mx.array, mx.array, int, int] | None = None
    _views_cache: tuple | None = None  # (what the body views were cut from, the views)
    # (id, keys, values, body_len, head_k, head_v, key_center, then both sides' fields) of
    # the last views made: _views copies them while those stay the same (host time a step)
    _sides_memo: tuple | None = None
    # False: every step takes the general path (the fast path's reference in the tests)
    DECODE_FAST_PATH = True
    # On CUDA a decode step's new positions go to the layer kernel, which writes them into
    # the tail buffer (TailAppend). False: two slice updates a step, as elsewhere.
    KERNEL_WRITES_TAIL = True
    # Such a step's sides carry the tail buffer and the tail's length (BufferedTail), not
    # two tail views cut a step. False: the views (sessions 14-16), for comparison.
    BUFFERED_TAIL = True
    _pending: TailAppend | None = None  # this step's positions, until written or taken
    # (offset, whether defers_rope said yes) of this step: its query's rope asks, its key's
    # reads it (rope_fusion.DeferringRope)
    _rope_step: tuple | None = None
    # (the _tail_buf a deferred step left, the tail length the next step must stay under,
    # the buffer's dtype): defers_rope's rule, less what stays true while that tuple is the
    # buffer -- every path that changes the sides replaces it (host time a layer a step)
    _armed: tuple | None = None
    # Per-channel key scales and biases stored (B, H, T/g, D): the CUDA split kernel reads a
    # tile's scales for all channels at once, coalesced this way (128K: 77 -> 58 us, ncu).
    # None: where the CUDA kernels read them; Metal keeps (B, H, D, T/g) for quantized_matmul.
    # The views handed out are (B, H, D, T/g) either way (swapped axes, strides as stored).
    KEY_SCALES_GROUP_MAJOR: bool | None = None
    _scales_gm = False  # how this instance's key body is stored now (set by _compress)

    _OPTIONS = (
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
        "sink_tokens",
        "window",
    )

    def __init__(self, config: TurboQuantConfig | None = None, **overrides: Any):
        """Build from a :class:`TurboQuantConfig` (fields may be overridden by keyword)."""
        cfg = config or TurboQuantConfig()
        unknown = set(overrides) - set(self._OPTIONS)
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
        self.sink_tokens = int(get("sink_tokens"))
        self.window = int(get("window"))
        if self.sink_tokens < 0 or self.window < 0:
            raise ValueError("sink_tokens and window must be >= 0")
        self._resolve()
        self.key_center = None
        self.keys = self.values = None
        self.head_k = self.head_v = self.tail_k = self.tail_v = None
        self.body_len = 0
        self.offset = 0

    def _resolve(self) -> None:
        # Validates the combination and records which quantizer each side really uses.
        self._sides_memo = self._armed = None  # (its specs, rotation, seed: the old options')
        self.key_quantizer = self._spec(self.key_bits, self.requested_key_quantizer).quantizer
        self.value_quantizer = self._spec(self.value_bits, self.requested_value_quantizer).quantizer
        if self.value_quantizer in KEY_ONLY_QUANTIZERS:
            raise ValueError(f"the {self.value_quantizer!r} quantizer is for keys only")

    def _spec(self, bits: int, requested: str | None) -> SideSpec:
        return make_side_spec(
            requested or self.quantizer, bits, self.group_size, self.use_normalization
        )

    # ------------------------------------------------------------------ specs per side

    def key_spec(self, dim: int) -> SideSpec:
        """Key-side spec resolved for head dim ``dim``."""
        q = self.requested_key_quantizer or self.quantizer
        return _resolved_spec(q, self.key_bits, self.group_size, self.use_normalization, dim)

    def value_spec(self, dim: int) -> SideSpec:
        """Value-side spec resolved for head dim ``dim``."""
        q = self.requested_value_quantizer or self.quantizer
        return _resolved_spec(q, self.value_bits, self.group_size, self.use_normalization, dim)

    @property
    def block(self) -> int:
        """Positions quantized together: a per-channel key group spans positions."""
        return self.group_size if self.key_quantizer in KEY_ONLY_QUANTIZERS else 1

    tail_k = _TailSide("_tail_k")
    tail_v = _TailSide("_tail_v")

    def _tail_in_buffer(self) -> bool:
        """The tail is the first ``_tail_buf[3]`` positions of its buffer (cut or not)."""
        buf = self._tail_buf
        if buf is None:
            return False
        return self._tail_uncut is not None or (buf[2] is not None and buf[2] is self._tail_k)

    def _dims(self) -> tuple[int, int]:
        ref_k = self.head_k if self.head_k is not None else self.tail_k
        ref_v = self.head_v if self.head_v is not None else self.tail_v
        return ref_k.shape[-1], ref_v.shape[-1]

    def _rotate(self, x: mx.array) -> mx.array:
        if self.use_rotation:
            return rotate(x, get_rotation(x.shape[-1], self.seed))
        return x.astype(mx.float32)

    def _unrotate(self, x: mx.array) -> mx.array:
        if self.use_rotation:
            return unrotate(x, get_rotation(x.shape[-1], self.seed))
        return x

    def _center(self, k_rot: mx.array) -> mx.array:
        # Fixed once: changing it later would shift old and new scores differently.
        if not self._centering:
            return k_rot
        if self.key_center is None:
            # Position 0 is left out when no sink holds it (usually BOS, an outlier).
            first = 1 if self.head_k.shape[2] == 0 else 0
            window = self._rotate(self.tail_k[:, :, first : self.CENTER_POSITIONS])
            self.key_center = mx.mean(window, axis=2, keepdims=True)
        return k_rot - self.key_center

    # ------------------------------------------------------------------ mlx-lm interface

    @property
    def offset(self) -> int:
        # Noted: a deferring rope handed this very int knows whose step it is (rope_fusion).
        rope_fusion._last_read = weakref.ref(self)  # (CPython hands back the same ref)
        return self._offset

    @offset.setter
    def offset(self, value: int) -> None:
        self._offset = value

    def _fast(self, buf, n: int) -> bool:
        # A decode step: the tail is a view of its buffer, so the sink is full (the tail
        # takes nothing before it is) and the step fits -- _append_tail's ops, less Python.
        return (
            self._tail_in_buffer()
            and n <= self.TAIL_APPEND_MAX
            and buf[3] + n <= buf[4]
            and self.DECODE_FAST_PATH
        )

    def _deferrable(self, buf, n: int, dtype) -> bool:
        # A fast step the layer kernel writes (TailAppend): CUDA, no block leaves the tail.
        return (
            self.KERNEL_WRITES_TAIL
            and buf[3] + n - self.window < self.block
            and dtype == buf[0].dtype
            and join_workspace(self) is not None
        )

    def defers_rope(self, dtype, dims: int, dim: int) -> bool:
        """Whether this step's one new position goes to the layer kernel, which can then
        apply the rope (``dims`` of ``dim``) itself (rope_fusion.DeferringRope)."""
        buf = self._tail_buf
        armed = self._armed
        if armed is not None and armed[0] is buf:  # (the last step deferred: _defer_step)
            return (
                buf[3] < armed[1]
                and dtype == armed[2]
                and dims <= dim
                and self.DECODE_FAST_PATH
                and self.KERNEL_WRITES_TAIL
            )
        return (
            self.body_len > 0  # (else no kernel reads the step)
            and dims <= dim
            and self._fast(buf, 1)
            and self._deferrable(buf, 1, dtype)
        )

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[PackedSide, PackedSide]:
        """Append ``(B, H_kv, L, D)`` keys/values (quantizing what leaves the tail).

        ``keys`` may be a :class:`PendingRope` (rope_fusion): kept as it is for the layer
        kernel where this step defers its write, else rotated here."""
        if type(keys) is PendingRope and keys.offset is self._offset and self.BUFFERED_TAIL:
            # (its rope asked defers_rope this step: only the bookkeeping is left; only a
            # rope the installed patch wrapped makes a PendingRope, so no patch check)
            return self._defer_step(keys, values, self._settle(keep_writer=True), 1)
        _check_patch_installed()
        n = keys.shape[2]
        after = self._settle(keep_writer=True)  # the last step's positions
        buf = self._tail_buf
        if type(keys) is PendingRope and keys.offset is self._offset:
            fast = deferred = True  # (its rope asked defers_rope this step)
        else:
            fast = self._fast(buf, n)
            deferred = fast and self._deferrable(buf, n, keys.dtype)
            keys = as_array(keys)
        if after is not None and not deferred:
            mx.eval(after)  # it writes into this buffer in place: done before MLX ops read it
        if deferred:
            # The tail counts them now; the layer kernel writes them (TailAppend).
            if self.BUFFERED_TAIL:  # (cut only if something else reads the tail)
                return self._defer_step(keys, values, after, n)
            t = buf[3] + n
            self._cut_tail(buf, t)
            self._pending = TailAppend(keys, values, buf[3], after)
        elif fast:
            t = self._append_in_buffer(buf, keys, values, buf[3], n)
        else:
            t = self._store(keys, values, n)
        self.offset += n
        over = t - self.window
        if over >= self.block and self._center_ready():
            self._compress(over // self.block * self.block)
        return self._views()

    def _defer_step(self, keys, values: mx.array, after, n: int) -> tuple[PackedSide, PackedSide]:
        """A deferred step's bookkeeping, the buffered tail's way: the tail counts the ``n``
        new positions, the layer kernel writes them (``after``: the layer's last writer,
        which runs first). ``_deferrable`` held (no block leaves the tail: nothing to
        compress), so this is all -- every layer, every step on CUDA, where Python's host
        time sets the decode speed (bench/gpu_notes.md, sessions 19-20).

        It arms the next step (``_armed``): while the tuple made here is the buffer, no path
        changed the sides (each that does replaces or drops it, or sets a tail, which
        disarms), so ``defers_rope`` checks only the tail's length, dtype and the flags, and
        the next deferred step copies the views memo unchecked."""
        buf, armed = self._tail_buf, self._armed
        at = buf[3]
        t = at + n
        self._tail_buf = new = (buf[0], buf[1], None, t, buf[4])
        self._tail_uncut = t
        self._pending = TailAppend(keys, values, at, after)
        self._offset += n
        memo = self._sides_memo
        if armed is not None and armed[0] is buf and memo is not None:
            self._armed = (new, armed[1], armed[2])
            return self._copied_views(memo)
        # _fast and _deferrable for one position, but what stays true while armed
        limit = min(buf[4], self.window + self.block - 1)
        views = self._views()
        self._armed = (new, limit, buf[0].dtype) if self._sides_memo and self.body_len else None
        return views

    def _store(self, keys: mx.array, values: mx.array, n: int) -> int:
        """Put ``n`` new positions in the sink, then the tail; returns the tail's length."""
        if self.head_k is None:
            empty = lambda x: x[:, :, :0]  # noqa: E731
            self.head_k, self.head_v = empty(keys), empty(values)
            self.tail_k, self.tail_v = empty(keys), empty(values)
        i = 0
        room = self.sink_tokens - self.head_k.shape[2]
        if room > 0:  # the sink fills first (the body and tail are empty until then)
            i = min(room, n)
            self.head_k = mx.concatenate([self.head_k, keys[:, :, :i]], axis=2)
            self.head_v = mx.concatenate([self.head_v, values[:, :, :i]], axis=2)
        if i < n:  # (no slice op when all of it goes to the tail: decode steps)
            self._append_tail(keys[:, :, i:] if i else keys, values[:, :, i:] if i else values)
        return self.tail_k.shape[2]

    def _append_tail(self, k: mx.array, v: mx.array) -> None:
        t, n = self.tail_k.shape[2], k.shape[2]
        if n > self.TAIL_APPEND_MAX:  # a prefill chunk: most of it is quantized right away
            self._tail_buf = None
            self.tail_k = mx.concatenate([self.tail_k, k], axis=2)
            self.tail_v = mx.concatenate([self.tail_v, v], axis=2)
            return
        buf = self._tail_buf
        if not self._tail_in_buffer() or t + n > buf[4]:
            # Room for the window, one block and a draft: decode never outgrows it.
            cap = max(self.window + self.block + self.TAIL_APPEND_MAX, t + n)
            bk = mx.zeros((*k.shape[:2], cap, k.shape[3]), dtype=k.dtype)
            bv = mx.zeros((*v.shape[:2], cap, v.shape[3]), dtype=v.dtype)
            if t:
                bk[:, :, :t] = self.tail_k
                bv[:, :, :t] = self.tail_v
            buf = (bk, bv, None, t, cap)
        self._append_in_buffer(buf, k, v, t, n)

    def _append_in_buffer(self, buf: tuple, k: mx.array, v: mx.array, t: int, n: int) -> int:
        buf[0][:, :, t : t + n] = k
        buf[1][:, :, t : t + n] = v
        return self._cut_tail(buf, t + n)

    def _cut_tail(self, buf: tuple, length: int) -> int:
        # The tail becomes the buffers' first ``length`` positions (views of their arrays as
        # they are now: a slice update made new ones); the tuple keeps the lengths as ints
        # (an array's .shape builds a tuple) for as long as the view is the tail.
        self.tail_k, self.tail_v = buf[0][:, :, :length], buf[1][:, :, :length]
        self._tail_buf = (buf[0], buf[1], self.tail_k, length, buf[4])
        return length

    def _write(self, pending: TailAppend) -> None:
        """``pending``'s positions into the tail buffer by MLX ops (no kernel took them);
        the tail is still the view that counts them (every other path settles first)."""
        buf, at, n = self._tail_buf, pending.at, pending.k.shape[2]
        buf[0][:, :, at : at + n] = as_array(pending.k)
        buf[1][:, :, at : at + n] = pending.v
        if self._tail_uncut is None:  # (else the tail is cut from the buffers when read)
            self._cut_tail(buf, buf[3])

    def _settle(self, keep_writer: bool = False) -> mx.array | None:
        """Before anything reads or changes the tail (a state, a trim, a copy, an update): the
        last step's positions written by MLX ops if no kernel took them, else that kernel run
        to its end -- a graph built and never evaluated would never write them, and a reader
        on another stream (no data dependency on an in-place write) could run before it.
        ``keep_writer``: return that kernel's output instead of running it (the next decode
        step's kernel takes it as an input, which orders the two)."""
        pending = self._pending
        if pending is None:
            return None
        self._pending = None
        if pending.writer is None:
            self._write(pending)
        elif keep_writer:
            return pending.writer
        else:
            mx.eval(pending.writer)
        return None

    @property
    def _centering(self) -> bool:
        # Per-channel keys have a zero point per group: a centre would gain nothing.
        return self.center_keys and self.key_quantizer not in KEY_ONLY_QUANTIZERS

    def _center_ready(self) -> bool:
        # The centre is the mean of the first CENTER_POSITIONS positions after the sink,
        # whatever the chunking, so a prompt always stores the same bytes (prefix reuse).
        return (
            not self._centering
            or self.key_center is not None
            or self.tail_k.shape[2] >= self.CENTER_POSITIONS
        )

    def _compress(self, n: int) -> None:
        """Quantize the oldest ``n`` tail positions into the body."""
        k, v = self.tail_k[:, :, :n], self.tail_v[:, :, :n]
        k_spec, v_spec = self.key_spec(k.shape[-1]), self.value_spec(v.shape[-1])
        k_new = quantize(self._center(self._rotate(k)), k_spec)
        v_new = quantize(self._rotate(v), v_spec)
        self.tail_k, self.tail_v = self.tail_k[:, :, n:], self.tail_v[:, :, n:]
        if 0 < self.tail_k.shape[2] < n:
            # Copy what is left of a prefill chunk: a view would pin the whole full-precision
            # chunk (16x the body's bytes) until the next step. Decode steps keep the view.
            self.tail_k, self.tail_v = mx.contiguous(self.tail_k), mx.contiguous(self.tail_v)
        start, stop = self.body_len, self.body_len + n
        gm = _want_group_major(self.KEY_SCALES_GROUP_MAJOR)
        if self.keys is not None and gm != self._scales_gm and k_spec.per_channel:
            # a loaded state (always (B, H, D, T/g)): laid out as wanted here, once
            logical = self._logical(self.keys, k_spec)
            self.keys = tuple(mx.contiguous(p) for p in _stored_form(logical, k_spec, gm))
        self._scales_gm = gm
        k_new = _stored_form(k_new, k_spec, gm)  # (a view: the slice update below copies it)
        if self.keys is None:
            self.keys = tuple(_alloc(p, k_spec, n, self.step, gm) for p in k_new)
            self.values = tuple(_alloc(p, v_spec, n, self.step) for p in v_new)
        elif stop > body_positions(self._logical(self.keys, k_spec), k_spec):
            self.keys = tuple(_extend(p, k_spec, start, n, self.step, gm) for p in self.keys)
            self.values = tuple(_extend(p, v_spec, start, n, self.step) for p in self.values)
        for stored, new, spec, g in (
            (self.keys, k_new, k_spec, gm),
            (self.values, v_new, v_spec, False),
        ):
            for arr, part in zip(stored, new, strict=True):
                arr[_span(part, spec, start, stop, g)] = part
        self.body_len = stop
        # Views cut before these writes show the old body; a trim and a refill of as many
        # positions end at the same arrays and length, so a length check would keep them.
        self._views_cache = self._sides_memo = None

    def _logical(self, side: tuple[mx.array, ...], spec: SideSpec) -> tuple[mx.array, ...]:
        # The stored key parts as every reader takes them (group-major scales swapped back).
        return _stored_form(side, spec, self._scales_gm) if side is self.keys else side

    def _body(self, side: tuple[mx.array, ...], spec: SideSpec) -> tuple[mx.array, ...]:
        if body_positions(side, spec) == self.body_len:
            return side
        return tuple(p[_span(p, spec, 0, self.body_len)] for p in side)

    def _body_views(self) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
        k_dim, v_dim = self._dims()
        k_spec, v_spec = self.key_spec(k_dim), self.value_spec(v_dim)
        if self.keys is None:  # nothing quantized yet: zero-length parts of the right form
            lead = self.head_k.shape[:2]
            return empty_parts(k_spec, lead, k_dim), empty_parts(v_spec, lead, v_dim)
        # The body changes once a block (and its length with it): decode steps in between
        # reuse the same views instead of slicing six parts again (host time per layer).
        cached = self._views_cache
        if cached is not None:
            keys, values, n, ks, vs = cached[0]
            if keys is self.keys and values is self.values and n == self.body_len:
                if ks is k_spec and vs is v_spec:
                    return cached[1]
        views = (
            self._body(self._logical(self.keys, k_spec), k_spec),
            self._body(self.values, v_spec),
        )
        self._views_cache = ((self.keys, self.values, self.body_len, k_spec, v_spec), views)
        work = join_workspace(self)
        if work is not None:  # its memo holds the old views: they would keep the old body alive
            work.decode_memo = None
        return views

    def _views(self) -> tuple[PackedSide, PackedSide]:
        # Between blocks a decode step changes only the tails: the rest of both sides is
        # copied from the last views made (the checks cost less than making them again).
        memo = self._sides_memo
        if (
            memo is None
            or memo[1] is not self.keys
            or memo[2] is not self.values
            or memo[3] != self.body_len
            or memo[4] is not self.head_k
            or memo[5] is not self.head_v
            or memo[6] is not self.key_center
            or memo[0] != id(self)  # a copy (copy.deepcopy) makes its own, with its workspace
        ):
            return self._remember_views()
        return self._copied_views(memo)  # (the key side's workspace too: the same cache, by id)

    def _copied_views(self, memo: tuple) -> tuple[PackedSide, PackedSide]:
        """The sides of ``memo`` (current: :meth:`_views` checked it, or the steps since it
        was made deferred) with this step's tails."""
        n = self._tail_uncut
        if n is not None:  # (two BufferedTail made here: every layer, every step)
            buf, kf, vf = self._tail_buf, memo[7], memo[8]
            k, v = _new(BufferedTail), _new(BufferedTail)
            _set(k, "__dict__", dict(kf, tail_buf=(buf[0], n), append=self._pending, fields=kf))
            _set(v, "__dict__", dict(vf, tail_buf=(buf[1], n), append=None, fields=vf))
            return k, v
        return (
            PackedSide.with_tail(memo[7], self.tail_k, self._pending),
            PackedSide.with_tail(memo[8], self.tail_v),
        )

    def _remember_views(self) -> tuple[PackedSide, PackedSide]:
        kv = self._made_views()
        if self.keys is None or not self.DECODE_FAST_PATH:  # (the empty parts are made anew)
            self._sides_memo = None
            return kv
        # (the tails change every step: not kept alive by the memo)
        fields = [side.other_fields() for side in kv]
        self._sides_memo = (
            id(self), self.keys, self.values, self.body_len, self.head_k, self.head_v,
            self.key_center, fields[0], fields[1],
        )  # fmt: skip
        return kv

    def _made_views(self) -> tuple[PackedSide, PackedSide]:
        k_dim, v_dim = self._dims()
        k_parts, v_parts = self._body_views()
        rot, seed, n = self.use_rotation, self.seed, self.body_len
        return (
            PackedSide.made(k_parts, self.key_spec(k_dim), k_dim, rot, seed, self.key_center,
                            self.head_k, self.tail_k, n, join_workspace(self), self._pending),
            PackedSide.made(v_parts, self.value_spec(v_dim), v_dim, rot, seed, None, self.head_v,
                            self.tail_v, n, None),
        )  # fmt: skip

    def size(self) -> int:
        """Number of cached positions."""
        return self.offset

    @property
    def state(self) -> tuple[mx.array, ...] | list:
        """``head_k, head_v, tail_k, tail_v``, key body parts, value body parts, [center]."""
        if self.head_k is None:
            return []
        self._settle()
        k_parts, v_parts = self._body_views()
        center = () if self.key_center is None else (self.key_center,)
        return (self.head_k, self.head_v, self.tail_k, self.tail_v, *k_parts, *v_parts, *center)

    @state.setter
    def state(self, v) -> None:
        self._settle()  # (a kernel queued for the old tail still writes into its buffer)
        self.tail_k  # noqa: B018 -- cut: a state that fails to load leaves a whole tail
        self._tail_buf = None
        if v is None or len(v) == 0:
            self.keys = self.values = None
            self.head_k = self.head_v = self.tail_k = self.tail_v = None
            self.offset = self.body_len = 0
            return

        # An affine/channel side is (packed, scales, biases), a codebook side (packed,
        # norms): norms have one axis less than packed, scales the same number of axes.
        def side_len(i: int) -> int:
            return 3 if v[i + 1].ndim == v[i].ndim else 2

        try:
            n_key = side_len(4)
            n_val = side_len(4 + n_key)
        except IndexError as exc:
            raise ValueError(f"not a TurboQuantKVCache state ({len(v)} arrays)") from exc
        rest = v[4 + n_key + n_val :]
        if len(rest) > 1:
            raise ValueError(f"not a TurboQuantKVCache state ({len(v)} arrays)")
        self.head_k, self.head_v, self.tail_k, self.tail_v = v[:4]
        self.keys = tuple(v[4 : 4 + n_key])
        self._scales_gm = False  # a state is (B, H, D, T/g); _compress re-lays it if wanted
        self.values = tuple(v[4 + n_key : 4 + n_key + n_val])
        self.key_center = rest[0] if rest else None
        self._set_body_len()
        self.offset = self.head_k.shape[2] + self.body_len + self.tail_k.shape[2]

    def _set_body_len(self) -> None:
        # Positions in the stored body, read with the current quantizer settings.
        if self.keys is None:
            self.body_len = 0
            return
        k_dim, _ = self._dims()
        spec = self.key_spec(k_dim)
        self.body_len = body_positions(self._logical(self.keys, spec), spec)

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
            str(self.sink_tokens),
            str(self.window),
            str(self.body_len),
        )

    @meta_state.setter
    def meta_state(self, v) -> None:
        if len(v) != 14:
            raise ValueError(f"not a TurboQuantKVCache meta_state ({len(v)} strings)")
        quantizer, kb, vb, gs, rot, norm, seed, offset, center, kq, vq, sink, win, body = v
        self.center_keys = center == "1"
        self.requested_key_quantizer = kq or None
        self.requested_value_quantizer = vq or None
        self.quantizer = quantizer
        self.key_bits, self.value_bits, self.group_size = int(kb), int(vb), int(gs)
        self.use_rotation, self.use_normalization = rot == "1", norm == "1"
        self.seed = int(seed)
        self.sink_tokens, self.window = int(sink), int(win)
        self._resolve()
        if self.keys is not None:
            expect = (
                num_parts(self._spec(self.key_bits, self.requested_key_quantizer)),
                num_parts(self._spec(self.value_bits, self.requested_value_quantizer)),
            )
            if (len(self.keys), len(self.values)) != expect:
                raise ValueError("state does not match meta_state's quantizers")
            self._set_body_len()
            if self.body_len != int(body):
                raise ValueError("state does not match meta_state's body length")
        self.offset = int(offset)
        if self.head_k is not None:
            held = self.head_k.shape[2] + self.body_len + self.tail_k.shape[2]
            if held != self.offset:
                raise ValueError("state does not match meta_state's offset")

    @classmethod
    def from_state(cls, state, meta_state=None) -> TurboQuantKVCache:
        """Rebuild without ``__init__`` (state first, then the string meta state)."""
        obj = cls.__new__(cls)
        obj.state = state
        if meta_state is not None:
            obj.meta_state = meta_state
        return obj

    def __deepcopy__(self, memo: dict) -> TurboQuantKVCache:
        """A copy that never writes into this cache's tail buffer: the arrays are shared (an
        MLX copy shares its data), and kernels write new positions in place (TailAppend), so
        the copy's next step starts a buffer of its own."""
        self._settle()
        self.tail_k  # noqa: B018 -- cut: the copy takes the views, not this cache's buffer
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        new._tail_buf = new._armed = None
        new._rope_step = None  # (the same offset object: the copy decides for itself)
        return new

    def is_trimmable(self) -> bool:
        """Always (a trim into the quantized body keeps what it can)."""
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; returns how many were dropped.

        The tail goes first, then the body, then the sink. Per-channel keys share their
        ranges over a group: the positions kept of a cut group come back to the tail,
        dequantized.
        """
        n = min(self.offset, n)
        if n == 0:
            return 0
        self._settle()
        left = n
        t = self.tail_k.shape[2]
        cut = min(left, t)
        self.tail_k, self.tail_v = self.tail_k[:, :, : t - cut], self.tail_v[:, :, : t - cut]
        left -= cut
        if left and self.body_len:
            cut = min(left, self.body_len)
            keep = self.body_len - cut
            left -= cut
            aligned = keep // self.block * self.block
            if aligned < keep:
                self.tail_k, self.tail_v = self._decompress(aligned, keep)
            self.body_len = aligned
            if aligned == 0:  # nothing quantized is left: the next fill starts afresh
                self.keys = self.values = None
                self.key_center = None
        if left:
            h = self.head_k.shape[2]
            self.head_k, self.head_v = self.head_k[:, :, : h - left], self.head_v[:, :, : h - left]
        self.offset -= n
        return n

    def _decompress(self, start: int, stop: int) -> tuple[mx.array, mx.array]:
        """Body positions ``[start, stop)`` back in full precision (model dtype)."""
        k_dim, v_dim = self._dims()
        out = []
        for side, spec, ref, center in (
            (self.keys, self.key_spec(k_dim), self.tail_k, self.key_center),
            (self.values, self.value_spec(v_dim), self.tail_v, None),
        ):
            # whole groups out, then the positions asked for
            lo, hi = start // self.block * self.block, _steps(stop, self.block)
            side = self._logical(side, spec)
            x = dequantize(tuple(p[_span(p, spec, lo, hi)] for p in side), spec)
            x = x[:, :, start - lo : stop - lo]
            if center is not None:
                x = x + center
            out.append(self._unrotate(x).astype(ref.dtype))
        return out[0], out[1]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """The attention mask for the next ``N`` queries (mlx-lm's helper)."""
        return create_attention_mask(
            N, offset=self.offset, return_array=return_array, window_size=window_size
        )

    def empty(self) -> bool:
        """True until something was stored (``state`` empty)."""
        return self.head_k is None

    def _fp_arrays(self) -> tuple[mx.array, ...]:
        return (self.head_k, self.head_v, self.tail_k, self.tail_v)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (body in whole steps), as mlx-lm's caches report it."""
        if self.head_k is None:
            return 0
        body = 0 if self.keys is None else sum(p.nbytes for p in (*self.keys, *self.values))
        buf = self._tail_buf
        if self._tail_in_buffer():
            fp = buf[0].nbytes + buf[1].nbytes + self.head_k.nbytes + self.head_v.nbytes
        else:
            fp = sum(a.nbytes for a in self._fp_arrays())
        return body + fp + self._center_nbytes()

    def _center_nbytes(self) -> int:
        return 0 if self.key_center is None else self.key_center.nbytes

    @property
    def used_nbytes(self) -> int:
        """Bytes holding the ``offset`` stored positions."""
        return self.stored_nbytes()

    def stored_nbytes(self, full_precision_bytes: int | None = None) -> int:
        """Bytes holding the ``offset`` positions; the full-precision head and tail at
        ``full_precision_bytes`` per element if given (2: as in a float16 model)."""
        if self.head_k is None:
            return 0
        k_parts, v_parts = self._body_views()
        body = sum(p.nbytes for p in (*k_parts, *v_parts))
        fp = self._fp_arrays()
        if full_precision_bytes is None:
            fp_bytes = sum(a.nbytes for a in fp)
        else:
            fp_bytes = sum(a.size for a in fp) * full_precision_bytes
        return body + fp_bytes + self._center_nbytes()

    @property
    def fp16_nbytes(self) -> int:
        """What an fp16 ``KVCache`` would hold for the same ``offset`` positions."""
        if self.head_k is None:
            return 0
        B, H = self.head_k.shape[:2]
        k_dim, v_dim = self._dims()
        return B * H * self.offset * (k_dim + v_dim) * 2

    def effective_bits(self, full_precision_bytes: int | None = None) -> float:
        """Stored bits per cached element (keys and values together); needs data."""
        if self.head_k is None or self.offset == 0:
            raise ValueError("cache is empty")
        return 16.0 * self.stored_nbytes(full_precision_bytes) / self.fp16_nbytes

    def __repr__(self) -> str:
        return (
            f"TurboQuantKVCache(quantizer={self.quantizer!r}, key_bits={self.key_bits}, "
            f"value_bits={self.value_bits}, group_size={self.group_size}, "
            f"sink_tokens={self.sink_tokens}, window={self.window}, offset={self.offset})"
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


# --------------------------------------------------------------------------- body storage
# A per-vector side is (B, H, T, ..) in every part; a per-channel key side is transposed,
# (B, H, D, T*b/32) codes and (B, H, D, T/g) scales and biases: positions on the last axis.
# Group-major ("gm") storage keeps those scales and biases as (B, H, T/g, D) instead.


JOIN_COUNTER_ROWS = 4096  # batch x KV heads x head tiles a fused decode launch may have
JOIN_WORK_GROW = 65536  # floats a workspace grows by at least (a growth is a fresh GPU fill)
_JOIN_WORKSPACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NONE_YET = object()


class JoinWorkspace:
    """One cache layer's scratch for the fused decode kernel (kernels/mma_decode.py,
    FUSED_JOIN), float32: ``JOIN_COUNTER_ROWS`` int32 counters (zeros the kernel returns to
    after every launch), then the splits' partials. The kernel writes it through an input,
    so a launch has one output: MLX's host work per launch grows with each output."""

    __slots__ = ("array", "floats", "decode_memo")

    def __init__(self, floats: int = 0) -> None:
        self.floats = -1
        # the layer's last fused decode plan (mma_decode._DecodeMemo): host time per layer
        self.decode_memo = None
        self.at_least(floats)

    def at_least(self, floats: int) -> mx.array:
        """The array, with room for ``floats`` after the counters: grown in zeros when short
        (the old one stays alive while a queued launch still holds it)."""
        if floats > self.floats:
            self.floats = -(-max(floats, 1) // JOIN_WORK_GROW) * JOIN_WORK_GROW
            # a GPU fill (device memory): counters at 0, which is 0.0f too
            self.array = mx.zeros((JOIN_COUNTER_ROWS + self.floats,), dtype=mx.float32)
        return self.array


def join_workspace(cache) -> JoinWorkspace | None:
    """``cache``'s workspace for the fused decode kernel, made once on CUDA, None elsewhere.
    Kept beside the cache, not in it, so a copied cache (``copy.deepcopy``: prompt-cache
    reuse) gets its own, never a copy of one in use."""
    # Every decode step of every layer asks: an attribute read, not a weak-key lookup (~1 us).
    # A copied cache carries the memo too, but under another id: it asks the dictionary.
    memo = cache.__dict__.get("_join_workspace_memo")
    if memo is not None and memo[0] == id(cache):
        return memo[1]
    work = _JOIN_WORKSPACES.get(cache, _NONE_YET)
    if work is _NONE_YET:
        from .kernels.fused_decode import cuda_available

        work = JoinWorkspace() if cuda_available() else None
        _JOIN_WORKSPACES[cache] = work
    cache._join_workspace_memo = (id(cache), work)
    return work


def _want_group_major(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    from .kernels.fused_decode import cuda_available  # (kernels import this module)

    return cuda_available()


def _is_gm(part: mx.array, spec: SideSpec, gm: bool) -> bool:
    return gm and spec.per_channel and part.dtype != mx.uint32


def _stored_form(parts: tuple[mx.array, ...], spec: SideSpec, gm: bool) -> tuple[mx.array, ...]:
    """Logical parts as stored, or stored parts as logical (the same swap both ways, views)."""
    if not (gm and spec.per_channel):
        return parts
    return tuple(p.swapaxes(-1, -2) if _is_gm(p, spec, gm) else p for p in parts)


def _span(part: mx.array, spec: SideSpec, start: int, stop: int, gm: bool = False) -> tuple:
    """The index of positions ``[start, stop)`` in one stored part."""
    if _is_gm(part, spec, gm):
        return (slice(None), slice(None), slice(start // spec.group_size, stop // spec.group_size))
    if not spec.per_channel:
        return (slice(None), slice(None), slice(start, stop))
    if part.dtype == mx.uint32:  # packed codes: 32/b positions per word
        return (..., slice(start * spec.bits // 32, stop * spec.bits // 32))
    return (..., slice(start // spec.group_size, stop // spec.group_size))


def _steps(n: int, step: int) -> int:
    return (n + step - 1) // step * step


def _alloc(part: mx.array, spec: SideSpec, n: int, step: int, gm: bool = False) -> mx.array:
    """A zeroed part with room for ``n`` positions rounded up to whole steps."""
    return _extend(part[_span(part, spec, 0, 0, gm)], spec, 0, n, step, gm)


def _extend(
    part: mx.array, spec: SideSpec, used: int, n: int, step: int, gm: bool = False
) -> mx.array:
    """``part`` cut to ``used`` positions plus zeroed whole steps for ``n`` more (mlx-lm's
    growth policy)."""
    kept = part[_span(part, spec, 0, used, gm)]
    axis = kept.ndim - 1 if spec.per_channel and not _is_gm(part, spec, gm) else 2
    shape = list(kept.shape)
    shape[axis] = _width(part, spec, _steps(n, step))
    return mx.concatenate([kept, mx.zeros(shape, dtype=kept.dtype)], axis=axis)


def _width(part: mx.array, spec: SideSpec, n: int) -> int:
    """How many entries along the position axis ``n`` positions take in ``part``."""
    if not spec.per_channel:
        return n
    if part.dtype == mx.uint32:
        return n * spec.bits // 32
    return n // spec.group_size


@lru_cache(maxsize=256)
def _resolved_spec(quantizer: str, bits: int, group: int, norm: bool, dim: int) -> SideSpec:
    return make_side_spec(quantizer, bits, group, norm).for_dim(dim)


def _check_patch_installed() -> None:
    # A dict lookup, not an import, on every update: patch.py imports this module.
    patch = sys.modules.get(__package__ + ".patch")
    if patch is None or not patch.is_installed():
        raise RuntimeError(
            "TurboQuantKVCache needs the attention patch: call "
            "services.turboquant.install_patch() (make_turboquant_cache does it)"
        )
