"""Hook the fused CUDA decode kernel into ``attention.decode_attention`` (docs/turboquant.md).

``install()`` registers :func:`cuda_decode_kernel` with ``set_decode_kernel`` when MLX
runs on CUDA; elsewhere (Metal, CPU) nothing changes and the portable path runs.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import mma_decode
from .fused_decode import (
    AFFINE_BITS,
    CODEBOOK_BITS,
    HEAD_DIMS,
    cuda_available,
    fused_decode_attention,
)

# Where the fused kernel beat MLX's quantized_matmul route for the affine format on the
# H200 (bench/gpu_notes.md, kernel v2): D <= 128 from ~16K tokens on. Codebook has no fast
# portable route, so it always takes the kernel.
AFFINE_MIN_CONTEXT = 16384
AFFINE_MAX_DIM = 128


def supports(q_rot: mx.array, keys: Any, values: Any, mask: Any) -> bool:
    """Whether the kernel handles this decode call (else the portable path must)."""
    ks, vs = keys.spec, values.spec
    if q_rot.shape[2] != 1 or (mask is not None and not isinstance(mask, str)):
        return False  # additive/boolean mask arrays are left to the portable path
    if isinstance(mask, str) and mask != "causal":
        return False
    if ks.quantizer != vs.quantizer or keys.dim != values.dim or keys.dim not in HEAD_DIMS:
        return False
    allowed = AFFINE_BITS if ks.quantizer == "affine" else CODEBOOK_BITS
    if ks.bits not in allowed or vs.bits not in allowed:
        return False
    if ks.quantizer == "affine":
        gk = keys.dim // keys.parts[1].shape[-1]
        gv = values.dim // values.parts[1].shape[-1]
        return gk == gv and gk >= 32
    return True


def worthwhile(keys: Any) -> bool:
    """Whether the kernel is measured faster than the portable path for this cache."""
    if keys.spec.quantizer != "affine":
        return True
    return keys.dim <= AFFINE_MAX_DIM and keys.parts[0].shape[2] >= AFFINE_MIN_CONTEXT


def cuda_decode_kernel(q_rot, keys, values, scale, mask=None, sinks=None):
    """``DecodeKernel`` for ``set_decode_kernel``: fused output, or ``None`` to decline."""
    if not supports(q_rot, keys, values, mask) or not worthwhile(keys):
        return None
    kwargs: dict[str, Any] = {"quantizer": keys.spec.quantizer, "sinks": sinks}
    if keys.spec.quantizer == "codebook":
        # codebook.centroids is cached: one device array per (bits, dim).
        from services.turboquant.codebook import centroids

        kwargs["centroids_k"] = centroids(keys.spec.bits, keys.dim)
        kwargs["centroids_v"] = centroids(values.spec.bits, values.dim)
    # A single query is the last position: "causal" hides nothing from it.
    return fused_decode_attention(q_rot, keys.parts, values.parts, scale, **kwargs)


def mma_body_kernel(q_rot, keys, values, scale):
    """``BodyKernel`` for ``set_body_decode_kernel``: the tensor-core kernel (v4) takes
    every layout it can read -- the default per-channel keys with a sink and tail too."""
    if not mma_decode.supports(q_rot, keys, values):
        return None
    return mma_decode.mma_body_attention(q_rot, keys, values, scale)


def mma_layer_kernel(queries, q_rot, keys, values, scale, sinks=None):
    """``LayerKernel`` for ``set_layer_decode_kernel``: split kernel + fused join (two
    launches per layer); None where the body kernel + MLX join must do it."""
    if not mma_decode.supports(q_rot, keys, values):
        return None
    return mma_decode.mma_decode_layer(queries, q_rot, keys, values, scale, sinks)


def install() -> bool:
    """Register the CUDA decode kernel if MLX runs on CUDA; True when installed.

    The v4 tensor-core kernel replaces v3 (``cuda_decode_kernel``, kept for the bench):
    v4 reads every layout v3 did but head dim 32, and is faster (bench/gpu_notes.md).
    """
    if not cuda_available():
        return False
    from services.turboquant.attention import set_body_decode_kernel, set_layer_decode_kernel

    set_layer_decode_kernel(mma_layer_kernel)
    set_body_decode_kernel(mma_body_kernel)
    return True
