"""Tensor-core decode attention over a packed body (v4, CUDA; source in mma_source.py).

:func:`mma_body_attention` scores one rotated query per head against the quantized body
of a :class:`PackedSide` pair -- per-vector affine or codebook keys, or the default
per-channel keys -- and returns the body's normalised output (rotated space) and its
base-2 log-sum-exp, which ``attention.decode_with_body_kernel`` joins with the
full-precision sink and tail. Import-safe everywhere; kernels build on first CUDA call.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import mlx.core as mx

from .mma_source import MMA_COMBINE_SOURCE, MMA_HEADER, MMA_SPLIT_SOURCE

AFFINE_BITS = (2, 3, 4, 8)
CODEBOOK_BITS = (2, 3, 4)
HEAD_DIMS = (64, 128, 256)
WARPS = 4  # warps per block; each owns super-tiles of 128 positions
SUPER_TILE = 128
NUM_SMS_GUESS = 132  # H200; only steers the split count
LOG2E = 1.4426950408889634
KEY_LAYOUTS = {"affine": 0, "codebook": 1, "channel": 2}
VALUE_LAYOUTS = {"affine": 0, "codebook": 1}


@cache
def _split_kernel():
    return mx.fast.cuda_kernel(
        name="tq_mma_decode_split",
        input_names=[
            "q",
            "kw",
            "ks",
            "kb",
            "vw",
            "vs",
            "vb",
            "lut_k",
            "lut_v",
            "params",
            "iparams",
        ],  # fmt: skip
        output_names=["o_part", "ml_part"],
        source=MMA_SPLIT_SOURCE,
        header=MMA_HEADER,
        # The cache's sides are views sliced to the body: read them through their strides.
        ensure_row_contiguous=False,
    )


@cache
def _combine_kernel():
    return mx.fast.cuda_kernel(
        name="tq_mma_decode_combine",
        input_names=["o_part", "ml_part"],
        output_names=["out", "lse"],
        source=MMA_COMBINE_SOURCE,
        header=MMA_HEADER,
        ensure_row_contiguous=True,
    )


@lru_cache(maxsize=64)
def _const(value: float) -> mx.array:
    return mx.array([value], dtype=mx.float32)


@lru_cache(maxsize=8)
def _dummy(dtype: mx.Dtype) -> mx.array:
    return mx.zeros((1, 1, 1, 1), dtype=dtype)


def num_splits(length: int, blocks: int, num_sms: int = NUM_SMS_GUESS) -> int:
    """Context splits for about two blocks per SM, each at least one super-tile per warp."""
    want = max(1, math.ceil(2 * num_sms / max(1, blocks)))
    tiles = max(1, math.ceil(length / (SUPER_TILE * WARPS)))
    return max(1, min(want, tiles))


def side_layout(side, values: bool = False) -> tuple[int, int, int] | None:
    """``(layout, bits, group)`` the kernel reads for a packed side, or None if it cannot."""
    spec = side.spec
    table = VALUE_LAYOUTS if values else KEY_LAYOUTS
    if spec.quantizer not in table or side.dim not in HEAD_DIMS:
        return None
    allowed = CODEBOOK_BITS if spec.quantizer == "codebook" else AFFINE_BITS
    if spec.bits not in allowed:
        return None
    if spec.quantizer == "codebook":
        return table["codebook"], spec.bits, side.dim
    if spec.per_channel:
        if spec.group_size < 64:
            return None  # a half super-tile must sit inside one group of positions
        return table["channel"], spec.bits, spec.group_size
    group = side.dim // side.parts[1].shape[-1]
    if group < 32 or (values and group < side.dim // 8):
        return None
    return table["affine"], spec.bits, group


def supports(q_rot: mx.array, keys, values) -> bool:
    """Whether :func:`mma_body_attention` handles this decode call."""
    if q_rot.shape[2] != 1 or keys.dim != values.dim or keys.n_body == 0:
        return False
    if q_rot.shape[1] % keys.parts[0].shape[1]:
        return False
    if keys.parts[1].dtype != mx.float16 or values.parts[1].dtype != mx.float16:
        return False
    return side_layout(keys) is not None and side_layout(values, values=True) is not None


def mma_body_attention(
    q_rot: mx.array,
    keys,
    values,
    scale: float,
    *,
    splits: int | None = None,
    poison: bool = False,
) -> tuple[mx.array, mx.array]:
    """Attention of one query per head over the quantized body only.

    ``q_rot``: ``(B, Hq, 1, D)`` rotated (any float dtype), unscaled. Returns float32
    ``(out (B, Hq, 1, D) in the rotated space, lse2 (B, Hq, 1, 1))`` with ``lse2`` the
    base-2 log-sum-exp of ``scale * log2(e) * q.k`` over the body (the key centre, if
    any, is not included). ``poison`` fills the outputs with NaN first (tests).
    """
    k_layout, k_bits, k_group = side_layout(keys)
    v_layout, v_bits, v_group = side_layout(values, values=True)
    b, hq, _, d = q_rot.shape
    hkv = keys.parts[0].shape[1]
    n = keys.n_body
    group = hq // hkv
    n_ht = -(-group // 8)
    kw, ks = keys.parts[0], keys.parts[1]
    kb = keys.parts[2] if k_layout != 1 else _dummy(mx.float16)
    vw, vs = values.parts[0], values.parts[1]
    vb = values.parts[2] if v_layout != 1 else _dummy(mx.float16)
    lut_k = _lut(keys) if k_layout == 1 else _dummy(mx.float32)
    lut_v = _lut(values) if v_layout == 1 else _dummy(mx.float32)
    s = splits or num_splits(n, b * hkv * n_ht)
    init = float("nan") if poison else None
    o_part, ml_part = _split_kernel()(
        inputs=[
            q_rot.astype(mx.float32),
            kw,
            ks,
            kb,
            vw,
            vs,
            vb,
            lut_k,
            lut_v,
            _const(scale * LOG2E),
            mx.array([n], dtype=mx.int32),
        ],  # fmt: skip
        template=[
            ("KQ", k_layout),
            ("VQ", v_layout),
            ("KB", k_bits),
            ("VB", v_bits),
            ("KGS", k_group),
            ("VGS", v_group),
            ("D", d),
            ("WARPS", WARPS),
            ("ST", mx.float16),
        ],  # fmt: skip
        grid=(s * 32 * WARPS, hkv * n_ht, b),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(b, hq, s, d), (b, hq, s, 2)],
        output_dtypes=[mx.float32, mx.float32],
        init_value=init,
    )
    out, lse = _combine_kernel()(
        inputs=[o_part, ml_part],
        template=[("D", d)],
        grid=(b * hq * d, 1, 1),
        threadgroup=(d, 1, 1),
        output_shapes=[(b, hq, 1, d), (b, hq, 1, 1)],
        output_dtypes=[mx.float32, mx.float32],
        init_value=init,
    )
    return out, lse


def _lut(side) -> mx.array:
    from services.turboquant.codebook import centroids

    return centroids(side.spec.bits, side.dim).astype(mx.float32)
