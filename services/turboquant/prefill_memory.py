"""Peak memory of a long prefill: quantize as we go vs full precision then quantize once.

``python -m services.turboquant.prefill_memory --model DIR --tokens 4096`` prints, for the
model's plain ``KVCache``, our cache filled chunk by chunk, and a ``KVCache`` prefill
converted at the end (:meth:`TurboQuantKVCache.from_kv_cache`), the peak memory above the
loaded weights (``mx.get_peak_memory``) and the bytes the cache holds afterwards.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from .cache import TurboQuantKVCache
from .config import TurboQuantConfig
from .patch import ensure_patched


def _prefill(model, tokens: mx.array, cache: list, step: int) -> None:
    for start in range(0, tokens.shape[1], step):
        model(tokens[:, start : start + step], cache=cache)
        mx.eval([c.state for c in cache])


def measure(model, n_tokens: int, config: TurboQuantConfig, step: int = 512) -> list[dict]:
    """Rows ``{"mode", "peak_above_weights_mb", "cache_mb", "seconds"}`` for three modes."""
    ensure_patched(model)
    tokens = mx.random.randint(0, 1000, (1, n_tokens), key=mx.random.key(0))
    rows = []
    for mode in ("kvcache", "turboquant", "kvcache_then_quantize"):
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        if mode == "turboquant":
            cache = [
                TurboQuantKVCache(config) if type(c) is KVCache else c
                for c in make_prompt_cache(model)
            ]
            _prefill(model, tokens, cache, step)
        else:
            cache = make_prompt_cache(model)
            _prefill(model, tokens, cache, step)
            if mode == "kvcache_then_quantize":
                cache = [
                    TurboQuantKVCache.from_kv_cache(c, config) if type(c) is KVCache else c
                    for c in cache
                ]
                mx.eval([c.state for c in cache])
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "mode": mode,
                "peak_above_weights_mb": (mx.get_peak_memory() - base) / 2**20,
                "cache_mb": sum(c.nbytes for c in cache) / 2**20,
                "seconds": seconds,
            }
        )
        del cache
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="python -m services.turboquant.prefill_memory")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--step", type=int, default=512, help="prefill chunk (tokens)")
    ap.add_argument("--quantizer", default="affine")
    ap.add_argument("--key-bits", type=int, default=4)
    ap.add_argument("--value-bits", type=int, default=4)
    ap.add_argument(
        "--layout",
        choices=["recommended", "plain"],
        default="recommended",
        help="the stack's default layout, or the paper's (every position, per vector)",
    )
    args = ap.parse_args(argv)
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, _ = load(args.model)
    model = dequantize_model(model)  # float32 weights: the fast path on CPU + BLAS
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    bits = dict(quantizer=args.quantizer, key_bits=args.key_bits, value_bits=args.value_bits)
    if args.layout == "plain":
        cfg = TurboQuantConfig(**bits)
    else:
        cfg = TurboQuantConfig.recommended(**bits)
    print(
        f"| mode | peak above weights (MB) | cache (MB) | seconds |  ({args.tokens} tokens, "
        f"chunks of {args.step}, {args.layout} {cfg.quantizer} k{cfg.key_bits}v{cfg.value_bits})"
    )
    for r in measure(model, args.tokens, cfg, args.step):
        print(
            f"| {r['mode']} | {r['peak_above_weights_mb']:.1f} | {r['cache_mb']:.1f} | "
            f"{r['seconds']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
