"""The one seam between the sidecar and the KV cache implementation.

With ``TQ_ENABLED=1`` the per-request cache comes from ``services.hybrid_cache``
(TurboQuant in softmax layers, the model's own cache elsewhere) after
``services.turboquant.install_patch()``; with ``TQ_ENABLED=0`` it is mlx-lm's plain
``make_prompt_cache``. Only the engine thread calls these functions (they touch MLX).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from mlx_lm.models.cache import make_prompt_cache

log = logging.getLogger("tqstack.sidecar")


@dataclass
class KVBackend:
    """How this sidecar builds and measures per-request caches."""

    model: Any
    turboquant: bool
    tq_config: Any = None
    kind: str = "pure_sdpa"
    compressed_layers: list[int] = field(default_factory=list)
    num_layers: int = 0
    bytes_per_token_fp16: int = 0
    bytes_per_token_actual: int = 0
    # per sequence, above bytes_per_token_actual: positions the cache keeps in full precision
    fixed_bytes_actual: int = 0
    patched_modules: list[str] = field(default_factory=list)

    def make_cache(self) -> list:
        """A fresh per-request cache list for the loaded model."""
        if self.turboquant:
            from services.hybrid_cache import make_turboquant_cache

            return make_turboquant_cache(self.model, self.tq_config)
        return make_prompt_cache(self.model)

    def memory(self, cache: list) -> dict[str, int]:
        """fp16-equivalent and actual bytes held by one request's cache."""
        from services.hybrid_cache import cache_memory

        m = cache_memory(cache)
        return {
            "fp16_equivalent_bytes": int(m["fp16_equivalent_bytes"]),
            "actual_bytes": int(m["actual_bytes"]),
        }

    def cache_config(self) -> dict[str, Any]:
        """The cache settings reported by /health."""
        if not self.turboquant:
            return {"type": "mlx-lm plain KVCache", "turboquant": False}
        from services.turboquant.attention import decode_calls, decode_path

        cfg = self.tq_config
        d = asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))
        # Which decode attention runs: the CUDA kernel, or MLX ops (Metal, CPU, or a layout
        # the kernel declines) -- calls counted over every layer of every step.
        decode = {"path": decode_path(), "calls": decode_calls()}
        return {"type": "turboquant", "turboquant": True, **_jsonable(d), "decode": decode}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
        for k, v in d.items()
    }


def _plain_bytes_per_token(model: Any, cache: list, itemsize: int) -> int:
    """K+V bytes per token over the layers whose plain cache grows with the context."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    args = getattr(model, "args", None)
    n_kv = getattr(args, "num_key_value_heads", None) or getattr(args, "num_attention_heads", 0)
    head_dim = getattr(args, "head_dim", None) or (
        getattr(args, "hidden_size", 0) // max(getattr(args, "num_attention_heads", 1) or 1, 1)
    )
    n_layers = sum(1 for c in cache if isinstance(c, (KVCache, RotatingKVCache)))
    return 2 * int(n_kv) * int(head_dim) * itemsize * n_layers


def build_backend(model: Any, settings: Any, dtype_itemsize: int) -> KVBackend:
    """Install the attention patch (when enabled) and describe the model's KV layout."""
    if settings.tq_enabled:
        try:
            from services.hybrid_cache import describe_model
            from services.turboquant import TurboQuantConfig, install_patch
        except ImportError as e:
            # Only while the TurboQuant package is absent from a partial checkout.
            log.warning("TurboQuant unavailable (%s): serving with mlx-lm's plain cache", e)
            return build_backend(
                model, settings.model_copy(update={"tq_enabled": False}), dtype_itemsize
            )

        config = TurboQuantConfig.from_settings(settings)
        patched = list(install_patch() or [])
        report = describe_model(model, config)
        return KVBackend(
            model=model,
            turboquant=True,
            tq_config=config,
            kind=str(report.kind),
            compressed_layers=list(report.compressed_layers),
            num_layers=int(report.num_layers),
            bytes_per_token_fp16=int(report.kv_bytes_per_token_fp16),
            bytes_per_token_actual=int(report.kv_bytes_per_token_compressed),
            fixed_bytes_actual=report.full_precision_positions * report.full_precision_extra_bytes,
            patched_modules=patched,
        )
    cache = make_prompt_cache(model)
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    kinds = {type(c) for c in cache}
    kind = "pure_sdpa" if kinds <= {KVCache, RotatingKVCache} else "hybrid"
    return KVBackend(
        model=model,
        turboquant=False,
        kind=kind,
        num_layers=len(cache),
        bytes_per_token_fp16=_plain_bytes_per_token(model, cache, 2),
        bytes_per_token_actual=_plain_bytes_per_token(model, cache, dtype_itemsize),
    )
