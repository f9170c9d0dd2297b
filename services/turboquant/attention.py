"""Attention over a :class:`TurboQuantKVCache` without dequantizing the cache.

The query is rotated once (float32), scored against the packed rotated keys, the softmax
runs in float32, values are accumulated in the rotated space and only the output is
rotated back. Decode (one query position) goes through :func:`decode_attention`, where a
fused kernel can be plugged in with :func:`set_decode_kernel`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import mlx.core as mx

from .cache import body_positions
from .codebook import centroids
from .packing import unpack
from .rope_fusion import as_array, set_kernel_takes_rope
from .rotation import rotate, unrotate

# Context positions per tile of the blocked paths: bounds what is materialised.
CONTEXT_BLOCK = 1024
# From this many query positions on (prefill chunks), the body is walked one tile at a time:
# dequantized tiles and dense matmuls (BLAS on CPU: mx.quantized_matmul is fast for a few
# query rows, its CPU kernel far slower for a chunk) under an online softmax, so a chunk's
# memory is bounded by the chunk times one tile, not by the context.
DENSE_PREFILL_MIN_QUERIES = 32

DecodeKernel = Callable[..., "mx.array | None"]
_decode_kernel: DecodeKernel | None = None
BodyKernel = Callable[..., "tuple[mx.array, mx.array] | None"]
_body_kernel: BodyKernel | None = None
LayerKernel = Callable[..., "mx.array | None"]
_layer_kernel: LayerKernel | None = None
# The layer kernel's ``steady`` (kernels/mma_decode.py): a steady decode step in one frame,
# asked before anything else here (host time a layer sets the decode speed on CUDA).
_steady_kernel: LayerKernel | None = None
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Decode calls (one query position) by the path that answered: /health shows them, so a
# kernel that declines a model's layout (and leaves decode to MLX ops) is visible.
_DECODE_CALLS = {"kernel": 0, "portable": 0}


def decode_calls() -> dict[str, int]:
    """Decode attention calls so far (every layer of every step): ``kernel`` (a CUDA
    kernel installed with the ``set_*_kernel`` hooks answered) or ``portable`` (MLX ops)."""
    return dict(_DECODE_CALLS)


def decode_path() -> str:
    """``"cuda-kernel"`` when a decode kernel is installed (MLX on CUDA), else
    ``"portable"`` (mlx ``quantized_matmul`` / tiled dequantization)."""
    kernels = (_layer_kernel, _body_kernel, _decode_kernel)
    return "cuda-kernel" if any(k is not None for k in kernels) else "portable"


@lru_cache(maxsize=1)
def no_float32_quantized_matmul() -> bool:
    """MLX's CUDA backend has no float32-activation ``quantized_matmul`` (0.32.4: "No
    implementation for problem shape ... activation: float32"): dequantize tiles there."""
    from .kernels.fused_decode import cuda_available

    return cuda_available()


def set_decode_kernel(fn: DecodeKernel | None) -> DecodeKernel | None:
    """Install ``fn(q_rot, keys, values, scale, mask, sinks)`` for decode; returns the old one.

    ``fn`` returns the rotated-space output (docs/turboquant.md, "Decode call") or ``None``
    to decline, in which case the portable path runs. ``None`` uninstalls.
    """
    global _decode_kernel
    old, _decode_kernel = _decode_kernel, fn
    return old


def set_body_decode_kernel(fn: BodyKernel | None) -> BodyKernel | None:
    """Install ``fn(q_rot, keys, values, scale)`` for decode; returns the old one.

    ``fn`` attends one query per head over the quantized body only and returns
    ``(out, lse2)``: the normalised rotated-space output and the base-2 log-sum-exp of
    ``scale * log2(e) * q.k`` (without the key centre), or ``None`` to decline. The
    full-precision sink and tail, the centre and learned sinks are joined here.
    """
    global _body_kernel
    old, _body_kernel = _body_kernel, fn
    return old


def set_layer_decode_kernel(fn: LayerKernel | None) -> LayerKernel | None:
    """Install ``fn(queries, keys, values, scale, sinks)`` for decode; returns the old one.

    ``fn`` gets the unrotated queries (rotating them is its job: no MLX ops spent on it
    when a kernel does it) and returns the layer's whole output (model space) or ``None``
    to decline, in which case the body kernel (if any) and then the portable path run."""
    global _layer_kernel, _steady_kernel
    old, _layer_kernel = _layer_kernel, fn
    _steady_kernel = getattr(fn, "steady", None)
    # ``fn.takes_rope``: it applies a PendingRope query's and new key's rope (rope_fusion)
    set_kernel_takes_rope(getattr(fn, "takes_rope", False))
    return old


def turboquant_attention(
    queries: mx.array,
    keys: Any,
    values: Any,
    scale: float,
    mask: Any = None,
    sinks: mx.array | None = None,
) -> mx.array:
    """SDPA of ``(B, H_q, L, D)`` queries over packed sides; output in the queries' dtype."""
    if _steady_kernel is not None and mask is None:  # (its launch writes the queries' dtype)
        out = _steady_kernel(queries, keys, values, scale, sinks)
        if out is not None:
            _DECODE_CALLS["kernel"] += 1
            return out
    if queries.shape[2] == 1 and mask == "causal":
        mask = None  # the one query is the last position: it sees the whole context
    one_query = queries.shape[2] == 1 and mask is None and keys.n_body
    if one_query and _layer_kernel is not None:
        out = _layer_kernel(queries, keys, values, scale, sinks)  # rotates q itself
        if out is not None:
            _DECODE_CALLS["kernel"] += 1
            return out.astype(queries.dtype)
    queries = as_array(queries)  # (a PendingRope the kernel did not take: rope_fusion)
    if getattr(keys, "append", None) is not None and keys.append.writer is None:
        keys, values = keys.append.written(keys, values)  # the paths below read the tail
    # (after the layer kernel, which needs no rotation here: host time per layer)
    k_rot, v_rot = keys.rotation, values.rotation
    # rotate() returns a new float32 array: the caller's queries are never written to.
    q = rotate(queries, k_rot) if k_rot is not None else queries.astype(mx.float32)
    if one_query:
        body = _body_kernel(q, keys, values, scale) if _body_kernel is not None else None
        if body is not None:
            _DECODE_CALLS["kernel"] += 1
            return join_body(queries, q, body, keys, values, scale, sinks).astype(queries.dtype)
    if not keys.body_only:
        if queries.shape[2] == 1:
            _DECODE_CALLS["portable"] += 1
        return attend_segments(queries, q, keys, values, scale, mask, sinks).astype(queries.dtype)
    if queries.shape[2] == 1:
        out = decode_attention(q, keys, values, scale, mask, sinks)
    else:
        out = attend(q, keys, values, scale, mask, sinks)
    if v_rot is not None:
        out = unrotate(out, v_rot)
    return out.astype(queries.dtype)


def decode_attention(q_rot, keys, values, scale, mask=None, sinks=None) -> mx.array:
    """One query position: the fused kernel if one is installed and accepts, else portable."""
    if _decode_kernel is not None:
        out = _decode_kernel(q_rot, keys, values, scale, mask, sinks)
        if out is not None:
            _DECODE_CALLS["kernel"] += 1
            return out
    _DECODE_CALLS["portable"] += 1
    return attend(q_rot, keys, values, scale, mask, sinks)


def attend(q_rot, keys, values, scale, mask=None, sinks=None) -> mx.array:
    """Portable attention in the rotated space; float32 ``(B, H_q, L, D_v)``."""
    B, n_q, L, D = q_rot.shape
    n_kv = keys.parts[0].shape[1]
    n_rep = n_q // n_kv
    q = q_rot * scale
    k_parts, v_parts = keys.parts, values.parts
    if n_rep > 1:
        # GQA: (B, H_kv, n_rep, L, D) against (B, H_kv, 1, T, .) -- no copies of the cache.
        q = q.reshape(B, n_kv, n_rep, L, D)
        k_parts = tuple(mx.expand_dims(p, 2) for p in k_parts)
        v_parts = tuple(mx.expand_dims(p, 2) for p in v_parts)

    if L >= DENSE_PREFILL_MIN_QUERIES or no_float32_quantized_matmul():
        total = body_positions(k_parts, keys.spec)
        acc, m, den = _body_state(q, k_parts, v_parts, keys.spec, values.spec, mask, 0, total)
        if sinks is not None:
            sink = _sink_logits(sinks, m.shape, n_kv, n_rep, n_q)
            top = mx.maximum(m, sink)
            w = mx.exp(m - top)
            acc, den = acc * w, den * w + mx.exp(sink - top)
        out = acc / den
    else:
        scores = _scores(q, k_parts, keys.spec)
        scores = _apply_mask(scores, mask, n_rep)
        probs = _softmax(scores, sinks, n_kv, n_rep, n_q)
        out = _weighted_values(probs, v_parts, values.spec)
    if n_rep > 1:
        out = out.reshape(B, n_q, L, out.shape[-1])
    return out


def _body_state(q, k_parts, v_parts, k_spec, v_spec, mask, col0: int, total: int, shift=None):
    """Online softmax over a quantized body, one tile of CONTEXT_BLOCK positions at a time.

    ``q`` is scaled, ``(.., L, D)``; the body's positions start at ``col0`` of a context
    of ``total`` (for the mask); ``shift`` is added to every score (the key centre's
    ``q.centre``). Returns ``(acc, m, den)``: the unnormalised rotated-space output, the
    running max and the sum of ``exp(score - m)``. Only one tile's scores and dequantized
    vectors exist at a time (a prefill chunk's memory is bounded by the chunk, not the
    context); the state is evaluated after each tile so the lazy graph does not keep them.
    """
    L = q.shape[-2]
    n_rep = q.shape[2] if q.ndim == 5 else 1
    acc = m = den = None
    k_tiles, v_tiles = _tiles(k_parts, k_spec), _tiles(v_parts, v_spec)
    for (start, stop, k_t, k_scale), (_, _, v_t, v_scale) in zip(k_tiles, v_tiles, strict=True):
        s = q @ (k_t if k_spec.per_channel else k_t.swapaxes(-1, -2))
        if k_scale is not None:
            s = s * k_scale
        if shift is not None:
            s = s + shift
        s = _apply_mask(s, _mask_columns(mask, col0 + start, col0 + stop, L, total), n_rep)
        top = mx.max(s, axis=-1, keepdims=True)
        m_new = top if m is None else mx.maximum(m, top)
        p = mx.exp(s - m_new)
        pv = (p if v_scale is None else p * v_scale) @ v_t
        if m is None:
            acc, den = pv, mx.sum(p, axis=-1, keepdims=True)
        else:
            alpha = mx.exp(m - m_new)
            acc, den = acc * alpha + pv, den * alpha + mx.sum(p, axis=-1, keepdims=True)
        m = m_new
        if stop < body_positions(k_parts, k_spec):
            mx.eval(acc, m, den)
    return acc, m, den


def attend_segments(queries, q_rot, keys, values, scale, mask=None, sinks=None) -> mx.array:
    """Attention over full-precision head and tail around the quantized body.

    Each segment is scored and masked at its place in the context; one softmax spans them
    (a shared maximum, then one sum), without gluing the score matrices together: a
    prefill chunk's scores are the largest arrays here. The body's value sum is rotated
    back before it joins the others. Float32 ``(B, H_q, L, D_v)``, model (unrotated) space.
    """
    B, n_q, L, D = queries.shape
    n_kv = keys.parts[0].shape[1]
    n_rep = n_q // n_kv

    def grouped(x: mx.array) -> mx.array:  # GQA: (B, H_kv, n_rep, L, D), no cache copies
        return x.reshape(B, n_kv, n_rep, L, x.shape[-1]) if n_rep > 1 else x

    def shared(x: mx.array) -> mx.array:
        return mx.expand_dims(x, 2) if n_rep > 1 else x

    q_fp = grouped(queries.astype(mx.float32) * scale)
    q_body = grouped(q_rot * scale)
    dense = L >= DENSE_PREFILL_MIN_QUERIES or no_float32_quantized_matmul()
    n_head, n_body, n_tail = keys.head.shape[2], keys.n_body, keys.tail.shape[2]
    total = n_head + n_body + n_tail
    rot = values.rotation
    segments = []  # (scores, how to sum values with them)
    states = []  # the body walked tile by tile (prefill): (m, acc, den), acc rotated back
    if n_head:
        s = q_fp @ shared(keys.head.astype(mx.float32)).swapaxes(-1, -2)
        v = shared(values.head.astype(mx.float32))
        segments.append((s, 0, lambda p, v=v: p @ v))
    if n_body:
        k_parts = tuple(shared(p) for p in keys.parts)
        v_parts = tuple(shared(p) for p in values.parts)
        # exact scores: the other segments are not centred
        shift = None if keys.center is None else q_body @ shared(keys.center).swapaxes(-1, -2)
        if dense:
            acc, m, den = _body_state(
                q_body, k_parts, v_parts, keys.spec, values.spec, mask, n_head, total, shift
            )
            states.append((m, unrotate(acc, rot) if rot is not None else acc, den))
        else:
            s = _scores(q_body, k_parts, keys.spec)
            s = s if shift is None else s + shift

            def body_values(p: mx.array) -> mx.array:
                out = _weighted_values(p, v_parts, values.spec)
                return unrotate(out, rot) if rot is not None else out

            segments.append((s, n_head, body_values))
    if n_tail:
        s = q_fp @ shared(keys.tail.astype(mx.float32)).swapaxes(-1, -2)
        v = shared(values.tail.astype(mx.float32))
        segments.append((s, n_head + n_body, lambda p, v=v: p @ v))
    masked = [
        _apply_mask(s, _mask_columns(mask, start, start + s.shape[-1], L, total), n_rep)
        for s, start, _ in segments
    ]
    top = None
    for m in [mx.max(s, axis=-1, keepdims=True) for s in masked] + [st[0] for st in states]:
        top = m if top is None else mx.maximum(top, m)
    sink = _sink_logits(sinks, top.shape, n_kv, n_rep, n_q) if sinks is not None else None
    if sink is not None:
        top = mx.maximum(top, sink)
    out = denom = None
    parts = []  # (this segment's share of the output, of the denominator)
    for s, (_, _, weigh) in zip(masked, segments, strict=True):
        p = mx.exp(s - top)
        parts.append((weigh(p), mx.sum(p, axis=-1, keepdims=True)))
    for m, acc, den in states:
        w = mx.exp(m - top)
        parts.append((acc * w, den * w))
    for part, mass in parts:
        out = part if out is None else out + part
        denom = mass if denom is None else denom + mass
    if sink is not None:
        denom = denom + mx.exp(sink - top)
    out = out / denom
    if n_rep > 1:
        out = out.reshape(B, n_q, L, out.shape[-1])
    return out


def centre_shift2(q_rot: mx.array, keys, scale: float) -> mx.array:
    """``scale * log2(e) * q_rot . centre`` per query head, ``(B, H_kv, rep, L)``: what a
    body scored against the centred keys leaves out of every score (base-2 units)."""
    B, n_q, L, D = q_rot.shape
    n_kv = keys.parts[0].shape[1]
    qg = q_rot.reshape(B, n_kv, n_q // n_kv, L, D)
    return (qg @ keys.center[:, :, None, 0, :, None])[..., 0] * (scale * LOG2E)


def _exp2(x: mx.array) -> mx.array:
    return mx.exp(x * LN2)  # MLX has log2 but no exp2


def join_body(queries, q_rot, body, keys, values, scale, sinks=None) -> mx.array:
    """One decode query's output from the body's ``(out, lse2)`` and the full-precision
    sink and tail (scored here: a few hundred positions at most); float32, model space.

    Each part is a normalised output with its base-2 log-sum-exp; they are weighed by
    ``2^(lse - max)``, as the splits of a flash-decoding kernel are.
    """
    B, n_q, _, D = queries.shape
    n_kv = keys.parts[0].shape[1]
    n_rep = n_q // n_kv
    out_b, lse_b = body
    if values.rotation is not None:
        out_b = unrotate(out_b, values.rotation)
    if keys.center is not None:  # the kernel's scores leave out q.centre; the others have none
        lse_b = lse_b + centre_shift2(q_rot, keys, scale).reshape(B, n_q, 1, 1)
    outs, lses = [out_b], [lse_b]
    fp = [x for x in (keys.head, keys.tail) if x is not None and x.shape[2]]
    if fp:
        vfp = [x for x in (values.head, values.tail) if x is not None and x.shape[2]]
        k = fp[0] if len(fp) == 1 else mx.concatenate(fp, axis=2)
        v = vfp[0] if len(vfp) == 1 else mx.concatenate(vfp, axis=2)
        qg = queries.astype(mx.float32).reshape(B, n_kv, n_rep, D)
        z = (qg @ k.astype(mx.float32).swapaxes(-1, -2)) * (scale * LOG2E)  # (B, Hkv, rep, n)
        m = mx.max(z, axis=-1, keepdims=True)
        p = _exp2(z - m)
        l_fp = mx.sum(p, axis=-1, keepdims=True)
        o_fp = (p @ v.astype(mx.float32)) / l_fp
        outs.append(o_fp.reshape(B, n_q, 1, -1))
        lses.append((m + mx.log2(l_fp)).reshape(B, n_q, 1, 1))
    top = lses[0]
    for x in lses[1:]:
        top = mx.maximum(top, x)
    sink = None
    if sinks is not None:
        sink = (sinks.astype(mx.float32) * LOG2E).reshape(1, n_q, 1, 1)
        top = mx.maximum(top, sink)
    out = denom = None
    for o, x in zip(outs, lses, strict=True):
        w = _exp2(x - top)
        out = o * w if out is None else out + o * w
        denom = w if denom is None else denom + w
    if sink is not None:
        denom = denom + _exp2(sink - top)
    return out / denom


def _mask_columns(mask: Any, start: int, stop: int, q_len: int, k_len: int) -> Any:
    """The part of ``mask`` over context positions ``[start, stop)``."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported mask {mask!r}")
        # Queries are the last q_len positions of the context.
        return mx.arange(k_len - q_len, k_len)[:, None] >= mx.arange(start, stop)[None]
    return mask[..., start:stop]


def _sink_logits(sinks: mx.array, shape: tuple, n_kv: int, n_rep: int, n_q: int) -> mx.array:
    """Learned per-head sink logits broadcast to ``shape`` (scores with one column)."""
    sink = sinks.astype(mx.float32)
    sink = sink.reshape(n_kv, n_rep, 1, 1) if n_rep > 1 else sink.reshape(n_q, 1, 1)
    return mx.broadcast_to(sink, shape)


def _softmax(scores: mx.array, sinks, n_kv: int, n_rep: int, n_q: int) -> mx.array:
    """Float32 softmax over the context; learned ``sinks`` logits take their share."""
    if sinks is None:
        return mx.softmax(scores, axis=-1, precise=True)
    sink = _sink_logits(sinks, (*scores.shape[:-1], 1), n_kv, n_rep, n_q)
    probs = mx.softmax(mx.concatenate([sink, scores], axis=-1), axis=-1, precise=True)
    return probs[..., 1:]


def _apply_mask(scores: mx.array, mask: Any, n_rep: int) -> mx.array:
    if mask is None:
        return scores
    if isinstance(mask, str):
        q_len, k_len = scores.shape[-2:]
        mask = _mask_columns(mask, 0, k_len, q_len, k_len)
    if n_rep > 1 and mask.ndim > 3:
        mask = mx.expand_dims(mask, -3)
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(mx.float32).min)
    return scores + mask.astype(mx.float32)


def _tiles(parts: tuple[mx.array, ...], spec):
    """``(start, stop, x, col_scale)`` per context tile: ``x`` float32 ``(.., tile, D)``.

    Codebook tiles are bare centroids; their per-vector norms come back as ``col_scale``
    (``(.., 1, tile)``), cheaper to apply to the ``L x tile`` product than to the tile.
    """
    if spec.per_channel:  # transposed: positions on the last axis, (.., D, tile) per tile
        n = parts[1].shape[-1] * spec.group_size
        for start in range(0, n, CONTEXT_BLOCK):
            stop = min(start + CONTEXT_BLOCK, n)
            w0, w1 = start * spec.bits // 32, stop * spec.bits // 32
            g0, g1 = start // spec.group_size, stop // spec.group_size
            x = mx.dequantize(
                parts[0][..., w0:w1],
                parts[1][..., g0:g1].astype(mx.float32),
                parts[2][..., g0:g1].astype(mx.float32),
                group_size=spec.group_size,
                bits=spec.bits,
            )
            yield start, stop, x, None
        return
    n = parts[0].shape[-2]
    for start in range(0, n, CONTEXT_BLOCK):
        stop = min(start + CONTEXT_BLOCK, n)
        if spec.quantizer == "affine":
            packed, scales, biases = (p[..., start:stop, :] for p in parts)
            x = mx.dequantize(
                packed,
                scales.astype(mx.float32),
                biases.astype(mx.float32),
                group_size=spec.group_size,
                bits=spec.bits,
            )
            yield start, stop, x, None
        else:
            packed, norms = parts
            dim = packed.shape[-1] * 32 // spec.bits
            idx = unpack(packed[..., start:stop, :], spec.bits).astype(mx.uint32)
            x = mx.take(centroids(spec.bits, dim), idx)
            yield start, stop, x, norms[..., None, start:stop].astype(mx.float32)


def _scores(q: mx.array, parts: tuple[mx.array, ...], spec) -> mx.array:
    """Scores of a few query rows (decode) over the whole body: ``(.., L, T)``."""
    if spec.quantizer in ("affine", "channel"):
        # Per-channel keys are stored transposed: q (.., L, D) @ K^T (.., D, T).
        return mx.quantized_matmul(
            q, *parts, transpose=not spec.per_channel, group_size=spec.group_size, bits=spec.bits
        )
    blocks = []
    for _start, _stop, k_blk, col_scale in _tiles(parts, spec):
        s = q @ k_blk.swapaxes(-1, -2)
        blocks.append(s if col_scale is None else s * col_scale)
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=-1)


def _weighted_values(probs: mx.array, parts: tuple[mx.array, ...], spec):
    if spec.quantizer == "affine":
        return mx.quantized_matmul(
            probs, *parts, transpose=False, group_size=spec.group_size, bits=spec.bits
        )
    out = None
    for start, stop, v_blk, col_scale in _tiles(parts, spec):
        p = probs[..., start:stop]
        part = (p if col_scale is None else p * col_scale) @ v_blk
        out = part if out is None else out + part
    return out
