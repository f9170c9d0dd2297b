"""Prefill / chunked prefill against a compressed prefix, with memory bounded by the chunk.

Portable (MLX ops only: CPU, Metal, CUDA). The packed rotated context is walked in blocks
of ``block`` tokens with an online (flash-style) softmax: at any time only one block of
dequantized keys/values (``block x D``) and one ``L x block`` score tile per head exist,
never the fp16 cache nor the full ``L x T`` score matrix. Output stays in the rotated
space, like ``attention.attend`` (docs/turboquant.md).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

DEFAULT_BLOCK = 2048


def _dequant_block(side: Any, start: int, stop: int, cents: mx.array | None) -> mx.array:
    """Float32 ``(B, H_kv, stop-start, D)`` rotated vectors of one context block."""
    spec = side.spec
    if spec.quantizer == "affine":
        packed, scales, biases = (p[..., start:stop, :] for p in side.parts)
        gs = side.dim // scales.shape[-1]
        return mx.dequantize(
            packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=gs,
            bits=spec.bits,
        )  # fmt: skip
    from services.turboquant.codebook import centroids
    from services.turboquant.packing import unpack

    packed, norms = side.parts
    idx = unpack(packed[..., start:stop, :], spec.bits).astype(mx.uint32)
    x = mx.take(centroids(spec.bits, side.dim) if cents is None else cents, idx)
    return x * norms[..., start:stop, None].astype(mx.float32)


def _block_mask(mask: Any, n_q: int, total: int, start: int, stop: int) -> mx.array | None:
    """Boolean/additive mask of one block, or None when nothing is hidden in it."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported mask {mask!r}")
        first_q = total - n_q  # queries are the last n_q positions of the context
        if stop - 1 <= first_q:
            return None  # the whole block is in every query's past
        q_pos = mx.arange(first_q, total)[:, None]
        return q_pos >= mx.arange(start, stop)[None]
    return mask[..., start:stop]


def blockwise_attention(
    q_rot: mx.array,
    keys: Any,
    values: Any,
    scale: float,
    mask: Any = None,
    sinks: mx.array | None = None,
    *,
    block: int = DEFAULT_BLOCK,
    centroids_k: mx.array | None = None,
    centroids_v: mx.array | None = None,
) -> mx.array:
    """Attention of ``L`` rotated queries over packed sides; float32 ``(B, H_q, L, D_v)``.

    ``keys``/``values`` are ``PackedSide``-like (``parts``, ``spec``, ``dim``); ``mask`` is
    None, ``"causal"`` or an array broadcastable to ``(B, H_q, L, T)``; ``sinks`` ``(H_q,)``.
    Codebook sides use ``codebook.centroids(bits, D)`` unless ``centroids_k/_v`` are given.
    The running softmax state is evaluated after every block: a lazy graph over the whole
    context would otherwise keep every block's scores alive (measured: peak grew with T).
    """
    b, n_q, length, d = q_rot.shape
    n_kv = keys.parts[0].shape[1]
    total = keys.parts[0].shape[2]
    rep = n_q // n_kv
    # GQA without copies: (B, H_kv, rep, L, D) against (B, H_kv, 1, blk, D).
    q = (q_rot.astype(mx.float32) * scale).reshape(b, n_kv, rep, length, d)
    m = mx.full((b, n_kv, rep, length, 1), -mx.inf, dtype=mx.float32)
    den = mx.zeros((b, n_kv, rep, length, 1), dtype=mx.float32)
    acc = None
    for start in range(0, total, block):
        stop = min(total, start + block)
        k = mx.expand_dims(_dequant_block(keys, start, stop, centroids_k), 2)
        v = mx.expand_dims(_dequant_block(values, start, stop, centroids_v), 2)
        s = q @ k.swapaxes(-1, -2)  # (B, H_kv, rep, L, blk)
        bm = _block_mask(mask, length, total, start, stop)
        if bm is not None:
            if bm.ndim == 4:  # (B|1, H_q|1, L, blk) -> split the head axis like q
                bm = bm.reshape(bm.shape[0], -1, 1 if bm.shape[1] == 1 else rep, *bm.shape[2:])
            if bm.dtype == mx.bool_:
                s = mx.where(bm, s, -mx.inf)
            else:
                s = s + bm.astype(mx.float32)
        m_new = mx.maximum(m, s.max(axis=-1, keepdims=True))
        # A row that has seen only masked keys keeps m = -inf: use 0 to avoid inf - inf.
        m_safe = mx.where(m_new == -mx.inf, 0.0, m_new)
        p = mx.exp(s - m_safe)
        alpha = mx.exp(m - m_safe)
        den = den * alpha + p.sum(axis=-1, keepdims=True)
        pv = p @ v
        acc = pv if acc is None else acc * alpha + pv
        m = m_new
        if stop < total:
            mx.eval(m, den, acc)
    if sinks is not None:
        sk = sinks.astype(mx.float32).reshape(1, n_kv, rep, 1, 1)
        m_new = mx.maximum(m, sk)
        alpha = mx.exp(m - m_new)
        den = den * alpha + mx.exp(sk - m_new)
        acc = acc * alpha
    out = acc / den
    return out.reshape(b, n_q, length, out.shape[-1])
