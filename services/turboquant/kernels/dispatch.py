"""Hook the CUDA decode kernels into ``attention.turboquant_attention`` (docs/turboquant.md).

``install()`` registers the tensor-core kernel (``mma_decode``) when MLX runs on CUDA:
the split kernel (its last blocks take the sink and tail) and the join for a whole decode
layer, and the split kernel with an MLX join where the layer kernel declines. Elsewhere
(Metal, CPU) nothing changes and the portable path runs. The v3 SIMT kernel
(``fused_decode``) is no longer installed: v4 reads every layout it did but head dim 32
and is 2-6x faster (bench/gpu_notes.md); the bench keeps timing it.
"""

from __future__ import annotations

from . import mma_decode
from .fused_decode import cuda_available

# ``LayerKernel`` for ``set_layer_decode_kernel``: the split kernel (which rotates the query
# and takes the sink and tail in its last blocks) and the join, fused into one launch where
# the plan allows; None where the body kernel + MLX join must do it. The function itself,
# not a wrapper: a call frame is host time on every layer (bench/gpu_notes.md, session 19).
mma_layer_kernel = mma_decode.mma_decode_layer


def mma_body_kernel(q_rot, keys, values, scale):
    """``BodyKernel`` for ``set_body_decode_kernel``: the split kernel over the body, its
    output and log-sum-exp joined with the sink and tail by MLX ops."""
    if not mma_decode.supports(q_rot, keys, values):
        return None
    return mma_decode.mma_body_attention(q_rot, keys, values, scale)


def install() -> bool:
    """Register the CUDA decode kernels if MLX runs on CUDA; True when installed."""
    if not cuda_available():
        return False
    from services.turboquant.attention import set_body_decode_kernel, set_layer_decode_kernel

    set_layer_decode_kernel(mma_layer_kernel)
    set_body_decode_kernel(mma_body_kernel)
    return True
