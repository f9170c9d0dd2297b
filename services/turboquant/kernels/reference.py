"""Float64 numpy reference for the fused decode kernel (runs everywhere, no MLX kernels).

It unpacks the stored bit streams itself (independently of ``mx.dequantize``), rebuilds
the stored rotated keys/values exactly and computes decode attention in float64. Tests
and the GPU bench compare the kernel against it.
"""

from __future__ import annotations

import numpy as np


def unpack_codes(words: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Codes ``(..., dim)`` (int64) from little-endian bit-stream rows of uint32 words."""
    w = np.asarray(words).astype(np.uint64)
    idx = np.arange(dim) * bits
    word, shift = idx // 32, (idx % 32).astype(np.uint64)
    lo = w[..., word] >> shift
    # A code that straddles two words takes its high bits from the next word.
    nxt = np.minimum(word + 1, w.shape[-1] - 1)
    spill = (idx % 32) + bits > 32
    hi = np.where(spill, w[..., nxt] << (np.uint64(32) - shift), np.uint64(0))
    return ((lo | hi) & np.uint64((1 << bits) - 1)).astype(np.int64)


def dequant_affine(words, scales, biases, bits: int, dim: int) -> np.ndarray:
    """``scale * code + bias`` per group, float64 ``(..., dim)``."""
    codes = unpack_codes(words, bits, dim).astype(np.float64)
    s = np.asarray(scales, dtype=np.float64)
    b = np.asarray(biases, dtype=np.float64)
    gs = dim // s.shape[-1]
    return codes * np.repeat(s, gs, axis=-1) + np.repeat(b, gs, axis=-1)


def dequant_codebook(words, norms, centroids, bits: int, dim: int) -> np.ndarray:
    """``norm * centroid[code]``, float64 ``(..., dim)``."""
    codes = unpack_codes(words, bits, dim)
    c = np.asarray(centroids, dtype=np.float64)
    return c[codes] * np.asarray(norms, dtype=np.float64)[..., None]


def decode_attention(q, k, v, scale: float, sinks=None, causal: bool = False) -> np.ndarray:
    """Softmax attention in float64; GQA by ``h // (Hq / Hkv)``.

    ``q`` ``(B, Hq, L, D)`` (the last ``L`` positions of the context), ``k``/``v``
    ``(B, Hkv, T, D)``, ``sinks`` ``(Hq,)`` or None; ``causal`` hides each query's future.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    bsz, hq, n_q, d = q.shape
    hkv, total = k.shape[1], k.shape[2]
    # Query head h = g * rep + r reads KV head g.
    qg = q.reshape(bsz, hkv, hq // hkv, n_q, d)
    s = np.einsum("bgrld,bgtd->bgrlt", qg, k) * scale
    if causal:
        visible = (total - n_q + np.arange(n_q))[:, None] >= np.arange(total)[None]
        s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    if sinks is not None:
        sk = np.asarray(sinks, dtype=np.float64).reshape(1, hkv, hq // hkv, 1, 1)
        m = np.maximum(m, sk)
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + np.exp(sk - m)
    out = np.einsum("bgrlt,bgtd->bgrld", p, v) / denom
    return out.reshape(bsz, hq, n_q, v.shape[-1])


def rel_error(out, ref) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN if ``out`` has any NaN)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
