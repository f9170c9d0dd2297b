"""GPU kernels for TurboQuant attention (CUDA via ``mx.fast.cuda_kernel``).

The portable paths live in ``services/turboquant/attention.py``; these are used only
where :func:`cuda_available` is true.
"""

from .dispatch import cuda_decode_kernel, install
from .fused_decode import cuda_available, fused_decode_attention

__all__ = ["cuda_available", "cuda_decode_kernel", "fused_decode_attention", "install"]
