"""GPU kernels for TurboQuant attention (CUDA via ``mx.fast.cuda_kernel``).

The portable decode path lives in ``services/turboquant/attention.py``; the fused kernel
is used only where :func:`cuda_available` is true. :func:`blockwise_attention` is a
portable prefill path over a compressed prefix whose memory is bounded by the block.
"""

from .blockwise import blockwise_attention
from .dispatch import cuda_decode_kernel, install
from .fused_decode import cuda_available, fused_decode_attention

__all__ = [
    "blockwise_attention",
    "cuda_available",
    "cuda_decode_kernel",
    "fused_decode_attention",
    "install",
]
