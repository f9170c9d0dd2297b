"""Bit packing of small integer codes into ``uint32`` words (the layout of ``mx.quantize``).

A row of ``D`` codes of ``b`` bits is one little-endian bit stream: code ``j`` occupies
bits ``[b*j, b*j + b)``; bit ``k`` of the stream is bit ``k % 32`` of word ``k // 32``.
For b = 2, 4, 8 no code straddles a word; for b = 3, 5, 6 some do. This is bit-for-bit what
``mx.quantize`` produces, so :func:`unpack` can use MLX's own dequantize kernel.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


def packed_words(dim: int, bits: int) -> int:
    """Number of uint32 words of one packed row of ``dim`` codes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if dim % 32:
        raise ValueError(f"head dim must be a multiple of 32 to pack codes, got {dim}")
    return dim * bits // 32


@lru_cache(maxsize=16)
def _layout(bits: int) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    # Static description of a block of 32 codes -> `bits` words: low part and spill part.
    j = np.arange(32)
    start = bits * j
    word = start // 32
    shift = start % 32
    spill = (shift + bits) > 32
    lo_onehot = (word[:, None] == np.arange(bits)[None, :]).astype(np.uint32)
    hi_onehot = ((word + 1)[:, None] == np.arange(bits)[None, :]) & spill[:, None]
    hi_shift = np.where(spill, 32 - shift, 0)
    return (
        mx.array(shift.astype(np.uint32)),
        mx.array(lo_onehot),
        mx.array(hi_onehot.astype(np.uint32)),
        mx.array(hi_shift.astype(np.uint32)),
    )


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack integer codes ``(..., D)`` in ``[0, 2^bits)`` into ``(..., D*bits/32)`` uint32."""
    dim = codes.shape[-1]
    n_words = packed_words(dim, bits)
    codes = codes.astype(mx.uint32)
    lead = codes.shape[:-1]
    if 32 % bits == 0:
        per = 32 // bits
        c = codes.reshape(*lead, n_words, per)
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        # Disjoint bit fields: a sum is a bitwise or.
        return mx.sum(c << shifts, axis=-1).astype(mx.uint32)
    shift, lo_onehot, hi_onehot, hi_shift = _layout(bits)
    c = codes.reshape(*lead, dim // 32, 32)
    lo = c << shift
    hi = mx.where(hi_shift > 0, c >> hi_shift, mx.zeros_like(c))
    words = mx.sum(lo[..., :, None] * lo_onehot, axis=-2) + mx.sum(
        hi[..., :, None] * hi_onehot, axis=-2
    )
    return words.astype(mx.uint32).reshape(*lead, n_words)


def unpack(packed: mx.array, bits: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Codes ``(..., D)`` from packed rows, as ``dtype`` (MLX's dequantize with unit scales)."""
    n_words = packed.shape[-1]
    dim = n_words * 32 // bits
    group = 32
    shape = (*packed.shape[:-1], dim // group)
    ones = mx.ones(shape, dtype=dtype)
    zeros = mx.zeros(shape, dtype=dtype)
    return mx.dequantize(packed, ones, zeros, group_size=group, bits=bits)
