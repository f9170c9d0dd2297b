"""Fused compressed decode attention on CUDA (``mx.fast.cuda_kernel``).

``fused_decode_attention`` scores one rotated query token per head against the packed
rotated keys and accumulates the packed rotated values in one pass over the cache
(split-K flash decoding, online softmax), without materialising any dequantized K or V.
Layouts and the calling contract: docs/turboquant.md. Import-safe everywhere; the kernels
are only built when first called on a CUDA device.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import mlx.core as mx

from .cuda_source import COMBINE_SOURCE, HEADER, SPLIT_SOURCE
from .jit import source_name

AFFINE_BITS = (2, 3, 4, 8)
CODEBOOK_BITS = (2, 3, 4)
HEAD_DIMS = (32, 64, 128, 256)
TPB = 256  # threads per block of the split kernel
TILE = 64  # tokens per online-softmax step (v2: 64 keeps 2 blocks of 256 per SM)
MAX_HEADS_PER_BLOCK = 4  # query heads sharing one pass over K/V (register budget)
NUM_SMS_GUESS = 132  # H200; only steers the split count
LOG2E = 1.4426950408889634


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when MLX runs on a CUDA GPU (so the fused kernel can be used)."""
    try:
        return bool(mx.cuda.is_available()) and mx.default_device() == mx.gpu
    except AttributeError:
        return False


@cache
def _split_kernel():
    return mx.fast.cuda_kernel(
        name=source_name("tq_decode_split", HEADER, SPLIT_SOURCE),
        input_names=["q", "kw", "ks", "kb", "vw", "vs", "vb", "lut_k", "lut_v", "params"],
        output_names=["o_part", "ml_part"],
        source=SPLIT_SOURCE,
        header=HEADER,
        # The cache sides arrive as views sliced to `offset`: read them through their
        # strides instead of letting MLX copy the whole cache every step.
        ensure_row_contiguous=False,
    )


@cache
def _combine_kernel():
    return mx.fast.cuda_kernel(
        name=source_name("tq_decode_combine", HEADER, COMBINE_SOURCE),
        input_names=["o_part", "ml_part", "sinks"],
        output_names=["out"],
        source=COMBINE_SOURCE,
        header=HEADER,
        ensure_row_contiguous=True,
    )


def device_constant(x: mx.array) -> mx.array:
    """``x`` copied by a GPU op and evaluated, for a kernel to read on every launch: MLX
    keeps arrays of <= 8 bytes, and arrays written by the host, in unified memory, which a
    kernel reads across the bus (bench/gpu_notes.md, session 6). Callers cache the copy."""
    x = x + 0.0
    mx.eval(x)
    return x


@lru_cache(maxsize=64)
def const_input(value: float) -> mx.array:
    """A cached float32 kernel input whose element 0 is ``value`` (16 bytes: see
    :func:`device_constant`)."""
    return device_constant(mx.array([value] * 4, dtype=mx.float32))


TAIL_PARAMS_MADE = 256  # tail lengths made at once (a decode tail holds window + a block)


def tail_params(value: float, tail_len: int) -> mx.array:
    """:func:`const_input` with the tail's length in element 1, for a split kernel that takes
    the whole tail buffers (template TLEN): cached, as a tail's lengths repeat every block,
    so a decode step makes no array (a host-made one would be read across the bus:
    :func:`device_constant`)."""
    table = _tail_params(value)
    return table[tail_len] if tail_len < len(table) else _tail_param(value, tail_len)


@lru_cache(maxsize=64)
def _tail_params(value: float) -> tuple[mx.array, ...]:
    # All at once: each made alone would evaluate (wait for the GPU) on a new decode step.
    made = [mx.array([value, float(n), 0.0, 0.0], dtype=mx.float32) + 0.0
            for n in range(TAIL_PARAMS_MADE)]  # fmt: skip
    mx.eval(made)
    return tuple(made)


@lru_cache(maxsize=1024)
def _tail_param(value: float, tail_len: int) -> mx.array:
    return device_constant(mx.array([value, float(tail_len), 0.0, 0.0], dtype=mx.float32))


@lru_cache(maxsize=8)
def dummy_input(dtype: mx.Dtype) -> mx.array:
    """A cached stand-in for an input a kernel variant does not read."""
    return mx.zeros((1, 1, 1, 1), dtype=dtype)


def heads_per_block(group: int) -> int:
    """Largest divisor of the GQA ratio that fits the register budget of one block."""
    return max(h for h in range(1, min(group, MAX_HEADS_PER_BLOCK) + 1) if group % h == 0)


def num_splits(
    length: int, blocks_per_split: int, num_sms: int = NUM_SMS_GUESS, tile: int = TILE
) -> int:
    """Context splits so the grid has about four blocks per SM (and no empty splits).

    The kernel recomputes the same chunk (a whole number of tiles) from the split count.
    """
    want = max(1, math.ceil(4 * num_sms / max(1, blocks_per_split)))
    tiles = max(1, math.ceil(length / tile))
    s = min(want, tiles)
    chunk = math.ceil(math.ceil(length / s) / tile) * tile
    return max(1, math.ceil(length / chunk))


def _check(q_rot: mx.array, keys: tuple, values: tuple, quantizer: str) -> tuple[int, int]:
    b, hq, l_q, d = q_rot.shape
    if l_q != 1:
        raise ValueError("fused decode attention takes one query token")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} not in {HEAD_DIMS}")
    hkv = keys[0].shape[1]
    if hq % hkv:
        raise ValueError("query heads must be a multiple of KV heads")
    n_k = keys[0].shape[-1]
    n_v = values[0].shape[-1]
    kbits, vbits = n_k * 32 // d, n_v * 32 // d
    allowed = AFFINE_BITS if quantizer == "affine" else CODEBOOK_BITS
    if kbits not in allowed or vbits not in allowed or n_k * 32 % d or n_v * 32 % d:
        raise ValueError(f"unsupported bits {kbits}/{vbits} for {quantizer}")
    if values[0].shape[2] != keys[0].shape[2] or values[0].shape[1] != hkv:
        raise ValueError("keys and values must have the same heads and length")
    return kbits, vbits


def fused_decode_attention(
    q_rot: mx.array,
    keys: tuple,
    values: tuple,
    scale: float,
    *,
    quantizer: str = "affine",
    group_size: int = 64,
    centroids_k: mx.array | None = None,
    centroids_v: mx.array | None = None,
    sinks: mx.array | None = None,
    splits: int | None = None,
    poison: bool = False,
    tpb: int = TPB,
    tile: int = TILE,
) -> mx.array:
    """Decode attention against a packed rotated cache; returns float32 ``(B, Hq, 1, D)``.

    ``q_rot``: float32 ``(B, Hq, 1, D)`` rotated, unscaled. ``keys``/``values``: the packed
    sides of docs/turboquant.md sliced to the valid length -- affine ``(w, scales, biases)``,
    codebook ``(w, norms)`` with ``centroids_k``/``centroids_v`` float32 ``(2^b,)``.
    The output stays in the rotated space. ``poison`` fills the outputs with NaN before
    the kernels run (tests use it to prove every element is written).
    """
    kbits, vbits = _check(q_rot, keys, values, quantizer)
    codebook = quantizer == "codebook"
    b, hq, _, d = q_rot.shape
    hkv, length = keys[0].shape[1], keys[0].shape[2]
    group = hq // hkv
    hb = heads_per_block(group)
    if codebook:
        kw, ks = keys
        vw, vs = values
        kb, vb = dummy_input(ks.dtype), dummy_input(vs.dtype)
        lut_k = centroids_k.astype(mx.float32)
        lut_v = centroids_v.astype(mx.float32)
        gs = 32
    else:
        kw, ks, kb = keys
        vw, vs, vb = values
        lut_k = lut_v = dummy_input(mx.float32)
        gs = d // ks.shape[-1]
        if gs != d // vs.shape[-1] or gs < 32:
            raise ValueError("keys and values must share a group size of at least 32")
    s = splits or num_splits(length, b * hkv * (group // hb), tile=tile)
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
            const_input(scale * LOG2E),
        ],
        template=[
            ("CB", codebook),
            ("KB", kbits),
            ("VB", vbits),
            ("GS", gs),
            ("D", d),
            ("HB", hb),
            ("TPB", tpb),
            ("TILE", tile),
            ("ST", ks.dtype),
        ],
        grid=(s * (group // hb) * tpb, hkv, b),
        threadgroup=(tpb, 1, 1),
        output_shapes=[(b, hq, s, d), (b, hq, s, 2)],
        output_dtypes=[mx.float32, mx.float32],
        init_value=init,
    )
    has_sinks = sinks is not None
    (out,) = _combine_kernel()(
        inputs=[
            o_part,
            ml_part,
            sinks.astype(mx.float32) if has_sinks else dummy_input(mx.float32),
        ],
        template=[("D", d), ("HAS_SINKS", has_sinks)],
        grid=(b * hq * d, 1, 1),
        threadgroup=(d, 1, 1),
        output_shapes=[(b, hq, 1, d)],
        output_dtypes=[mx.float32],
        init_value=init,
    )
    return out
