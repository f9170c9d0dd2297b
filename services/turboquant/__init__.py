"""TurboQuant KV cache for mlx-lm: rotated, quantized keys and values (docs/turboquant.md).

Typical use::

    from mlx_lm import load, generate
    from services.turboquant import TurboQuantConfig, make_turboquant_cache

    model, tokenizer = load(path)
    cache = make_turboquant_cache(model, TurboQuantConfig.recommended())
    text = generate(model, tokenizer, prompt, prompt_cache=cache)
"""

from __future__ import annotations

from typing import Any

from .attention import (
    decode_attention,
    set_body_decode_kernel,
    set_decode_kernel,
    set_layer_decode_kernel,
)
from .cache import PackedSide, TurboQuantKVCache
from .config import TurboQuantConfig
from .kernels import install as _install_cuda_decode  # fused decode kernel on CUDA (#7)
from .patch import (
    UnsupportedModelError,
    check_model_supported,
    ensure_patched,
    install_patch,
    is_installed,
    patched_modules,
    uninstall_patch,
)
from .persistence import load_turboquant_cache, save_turboquant_cache
from .quantizers import effective_bits

_install_cuda_decode()  # no-op unless MLX runs on CUDA

__all__ = [
    "PackedSide",
    "TurboQuantConfig",
    "TurboQuantKVCache",
    "UnsupportedModelError",
    "cache_memory",
    "check_model_supported",
    "decode_attention",
    "describe_model",
    "effective_bits",
    "ensure_patched",
    "install_patch",
    "is_installed",
    "load_turboquant_cache",
    "make_turboquant_cache",
    "patched_modules",
    "save_turboquant_cache",
    "set_body_decode_kernel",
    "set_decode_kernel",
    "set_layer_decode_kernel",
    "uninstall_patch",
]

_LAZY = {"make_turboquant_cache", "describe_model", "cache_memory"}


def __getattr__(name: str) -> Any:
    # hybrid_cache imports this package: resolve its functions on first use, no cycle.
    if name in _LAZY:
        from services import hybrid_cache

        return getattr(hybrid_cache, name)
    raise AttributeError(f"module 'services.turboquant' has no attribute {name!r}")
