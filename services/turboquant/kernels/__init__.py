"""GPU kernels for TurboQuant attention (CUDA via ``mx.fast.cuda_kernel``).

The portable decode path lives in ``services/turboquant/attention.py``; on CUDA,
:func:`install` hooks in the tensor-core decode kernel (:mod:`.mma_decode`).
:func:`fused_decode_attention` is the earlier SIMT kernel (v3), kept for comparison.
Prefill over a compressed prefix is portable (``attention._body_state``: tiles under an
online softmax, memory bounded by the chunk).
"""

from .dispatch import install
from .fused_decode import cuda_available, fused_decode_attention
from .mma_decode import mma_body_attention, mma_decode_layer

__all__ = [
    "cuda_available",
    "fused_decode_attention",
    "install",
    "mma_body_attention",
    "mma_decode_layer",
]
