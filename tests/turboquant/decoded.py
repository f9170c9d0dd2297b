"""What a packed side stands for, decoded: the reference our attention is checked against."""

from __future__ import annotations

import mlx.core as mx

from services.turboquant.quantizers import dequantize
from services.turboquant.rotation import unrotate


def decoded(side) -> mx.array:
    """Position-ordered float32 ``(B, H, T, D)``: head, dequantized body, tail."""
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
