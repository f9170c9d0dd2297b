"""GPU kernels for TurboQuant attention (CUDA via ``mx.fast.cuda_kernel``).

The portable decode path lives in ``services/turboquant/attention.py``; on CUDA,
:func:`install` hooks in the v4 tensor-core decode kernel (:mod:`.mma_decode`).
:func:`fused_decode_attention` is the earlier SIMT kernel (v3), kept for comparison.
:func:`blockwise_attention` is a portable prefill path over a compressed prefix whose
memory is bounded by the block.
"""

from .blockwise import blockwise_attention
from .dispatch import install
from .fused_decode import cuda_available, fused_decode_attention
from .mma_decode import mma_body_attention, mma_decode_layer

__all__ = [
    "blockwise_attention",
    "cuda_available",
    "fused_decode_attention",
    "install",
    "mma_body_attention",
    "mma_decode_layer",
]
