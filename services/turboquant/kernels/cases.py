"""Random packed caches for checking and timing the fused decode kernel.

Used by tests/turboquant/test_kernels.py and bench/attention_gpu.py, so that both check
the same function on fresh random inputs. Affine sides are made by ``mx.quantize`` (the
cache's own format); codebook sides by packing random codes with :func:`pack_codes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .reference import decode_attention, dequant_affine, dequant_codebook


def decoded(side) -> mx.array:
    """What a packed side stands for: position-ordered float32 ``(B, H, T, D)`` (head,
    dequantized body, tail), in the model's space."""
    from services.turboquant.quantizers import dequantize
    from services.turboquant.rotation import unrotate

    pieces = [] if side.head is None else [side.head.astype(mx.float32)]
    if side.n_body:
        x = dequantize(side.parts, side.spec)
        if side.center is not None:
            x = x + side.center
        if side.rotation is not None:
            x = unrotate(x, side.rotation)
        pieces.append(x)
    if side.tail is not None:
        pieces.append(side.tail.astype(mx.float32))
    return mx.concatenate(pieces, axis=2)


@dataclass
class CacheCase:
    """A real :class:`TurboQuantKVCache` after a decode step, its query and reference."""

    queries: mx.array  # (B, Hq, 1, D) float16, model space
    keys: object  # PackedSide
    values: object
    scale: float
    sinks: mx.array | None
    cache: object = None  # the TurboQuantKVCache

    def reference(self) -> np.ndarray:
        """Float64 attention over exactly what the cache stores, the step's new positions
        too where the kernel is to write them (``keys.append``)."""
        from services.turboquant.rope_fusion import as_array  # (a pending RoPE: its MLX op's)

        sinks = None if self.sinks is None else np.array(self.sinks)
        k, v = (np.array(decoded(x)) for x in (self.keys, self.values))
        append = self.keys.append
        if append is not None:
            n = append.k.shape[2]
            k[:, :, -n:], v[:, :, -n:] = np.array(as_array(append.k)), np.array(append.v)
        q = np.array(as_array(self.queries).astype(mx.float32))
        return decode_attention(q, k, v, self.scale, sinks)


def cache_case(rng, config, *, batch, q_heads, kv_heads, dim, length, sinks=False,
               steps=1) -> CacheCase:  # fmt: skip
    """Fill a cache built from ``config`` with ``length - steps`` random positions as a
    prompt, then one a decode step; keys have outlier channels like real ones. From the
    second step on, a step's position is the kernel's to write on CUDA (TailAppend)."""
    from services.turboquant import TurboQuantKVCache, install_patch

    install_patch()
    cache = TurboQuantKVCache(config)
    shape = (batch, kv_heads, length, dim)
    chan = 1.0 + 4.0 * (rng.random(dim) < 0.05)  # a few large channels
    k = mx.array((rng.standard_normal(shape) * chan + 0.5).astype(np.float16))
    v = mx.array(rng.standard_normal(shape).astype(np.float16))
    if length > steps:
        cache.update_and_fetch(k[:, :, :-steps], v[:, :, :-steps])
    for i in range(length - steps, length):
        ks, vs = cache.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
    q = mx.array((rng.standard_normal((batch, q_heads, 1, dim)) * 1.5).astype(np.float16))
    sk = mx.array(rng.standard_normal(q_heads).astype(np.float32)) if sinks else None
    return CacheCase(q, ks, vs, 1.0 / float(np.sqrt(dim)), sk, cache)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit-stream packing of ``(..., D)`` codes into ``(..., D*bits/32)`` uint32."""
    codes = np.asarray(codes, dtype=np.uint64)
    dim = codes.shape[-1]
    n_words = dim * bits // 32
    out = np.zeros((*codes.shape[:-1], n_words + 1), dtype=np.uint64)
    for j in range(dim):
        pos = j * bits
        w, sh = pos // 32, pos % 32
        out[..., w] |= (codes[..., j] << np.uint64(sh)) & np.uint64(0xFFFFFFFF)
        if sh + bits > 32:
            out[..., w + 1] |= codes[..., j] >> np.uint64(32 - sh)
    return out[..., :n_words].astype(np.uint32)


@dataclass
class Case:
    """One decode problem: kernel inputs (MLX) and the float64 reference output."""

    q_rot: mx.array
    keys: tuple
    values: tuple
    scale: float
    quantizer: str
    group_size: int
    centroids_k: mx.array | None
    centroids_v: mx.array | None
    sinks: mx.array | None
    k_deq: np.ndarray  # the stored keys, dequantized in float64
    v_deq: np.ndarray

    def reference(self) -> np.ndarray:
        """Float64 attention over exactly the stored (dequantized) keys and values."""
        sinks = None if self.sinks is None else np.array(self.sinks)
        return decode_attention(np.array(self.q_rot), self.k_deq, self.v_deq, self.scale, sinks)

    def kwargs(self) -> dict:
        """Keyword arguments of ``fused_decode_attention`` besides q, keys, values, scale."""
        return dict(
            quantizer=self.quantizer,
            group_size=self.group_size,
            centroids_k=self.centroids_k,
            centroids_v=self.centroids_v,
            sinks=self.sinks,
        )


def _affine_side(x: mx.array, bits: int, gs: int, length: int, dim: int):
    w, s, b = mx.quantize(x, group_size=gs, bits=bits)
    w, s, b = w[:, :, :length], s[:, :, :length], b[:, :, :length]
    deq = dequant_affine(
        np.array(w), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32)), bits, dim
    )
    # The sides are views of a larger buffer: the kernel must honour their strides.
    return (w, s, b), deq


def _codebook_side(rng, shape, bits: int, length: int, dim: int):
    codes = rng.integers(0, 1 << bits, size=(*shape, dim))
    w = pack_codes(codes, bits)
    norms = rng.uniform(0.5, 2.0, size=shape).astype(np.float16)
    cent = np.sort(rng.standard_normal(1 << bits) / np.sqrt(dim)).astype(np.float32)
    deq = dequant_codebook(
        w[:, :, :length], norms[:, :, :length].astype(np.float32), cent, bits, dim
    )
    side = (mx.array(w)[:, :, :length], mx.array(norms)[:, :, :length])
    return side, deq, mx.array(cent)


def make_case(
    rng: np.random.Generator,
    *,
    batch: int,
    q_heads: int,
    kv_heads: int,
    dim: int,
    length: int,
    quantizer: str = "affine",
    key_bits: int = 4,
    value_bits: int = 4,
    group_size: int = 64,
    capacity_extra: int = 0,
    sinks: bool = False,
) -> Case:
    """A fresh random case; the cache buffer holds ``capacity_extra`` unused positions."""
    cap = length + capacity_extra
    shape = (batch, kv_heads, cap)
    q = mx.array(rng.standard_normal((batch, q_heads, 1, dim)).astype(np.float32))
    scale = 1.0 / np.sqrt(dim)
    ck = cv = None
    if quantizer == "affine":
        # Keys with a large norm spread, so softmax is peaked and not uniform.
        kx = mx.array((rng.standard_normal((*shape, dim)) * 1.5).astype(np.float16))
        vx = mx.array(rng.standard_normal((*shape, dim)).astype(np.float16))
        keys, k_deq = _affine_side(kx, key_bits, group_size, length, dim)
        values, v_deq = _affine_side(vx, value_bits, group_size, length, dim)
    else:
        keys, k_deq, ck = _codebook_side(rng, shape, key_bits, length, dim)
        values, v_deq, cv = _codebook_side(rng, shape, value_bits, length, dim)
        # Codebook keys are unit-scale: stretch the query so the softmax is not flat.
        q = q * float(np.sqrt(dim))
    sk = mx.array(rng.standard_normal(q_heads).astype(np.float32)) if sinks else None
    return Case(q, keys, values, float(scale), quantizer, group_size, ck, cv, sk, k_deq, v_deq)
