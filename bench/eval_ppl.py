"""Perplexity of a model with a given KV cache, the cache really used for attention.

The text is the Python Language Reference prose shipped with every CPython
(``pydoc_data.topics``). Tokens are fed in fixed chunks (default 64) through one persistent
per-layer cache, so every chunk attends to all earlier tokens through the cache under test;
each chunk's logits score its next tokens.

Cache specs (shared with ``bench/kv_cache.py``)::

    fp                          the model's KVCache (model dtype)
    mlx8, mlx4, mlx4g32         mlx-lm QuantizedKVCache, bits[, group size] (default g64)
    tq:affine:k4v4              ours; quantizer affine|codebook, key/value bits
    tq:affine:k4v3:g32:norot:nonorm:nocenter:b2:bb8
                                group 32, rotation off, normalization off, key
                                centering off, 2 boundary layers at 8 bits
    tq:codebook:k4v4:kchan:g128:s1:w64
                                keys per channel (kchan|kaff|kcb; values vaff|vcb),
                                groups of 128, 1 sink position and a 64-position
                                window in full precision

Usage::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
    python -m bench.eval_ppl --model DIR --tokens 4096 --caches fp,mlx4,mlx8,tq:affine:k4v4
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

from services import hybrid_cache


def reference_text() -> str:
    """The Python Language Reference prose from CPython's ``pydoc_data.topics``."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics.values())


def text_tokens(tokenizer: Any, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of :func:`reference_text`."""
    text = reference_text()
    # Encode a prefix only: the whole text is ~460 KB and the slow tokenizers are slow.
    chars = max(8 * n_tokens, 4096)
    while True:
        ids = list(tokenizer.encode(text[:chars]))
        if len(ids) >= n_tokens + 1 or chars >= len(text):
            return ids[:n_tokens]
        chars *= 2


def load_float32(path: str | Path) -> tuple[nn.Module, Any]:
    """``mlx_lm.load`` then dequantize and cast to float32 (the fast dtype on CPU + BLAS)."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(path))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model, tokenizer


# --------------------------------------------------------------------------- cache specs


@dataclass
class CacheSpec:
    """A named way of building the per-layer cache list for a model."""

    name: str
    kind: str  # "fp" | "mlx" | "tq"
    bits: int = 16
    group_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)

    def tq_config(self) -> Any:
        """Our ``TurboQuantConfig`` for a ``tq:`` spec."""
        from services.turboquant.config import TurboQuantConfig

        return TurboQuantConfig(**self.options)

    def make(self, model: nn.Module) -> list[Any]:
        """A fresh per-layer cache list for ``model``."""
        if self.kind == "fp":
            return make_prompt_cache(model)
        if self.kind == "mlx":
            # Only the full-attention layers, exactly where ours would go.
            return hybrid_cache.replace_kv_caches(
                model, lambda _i, _b: QuantizedKVCache(group_size=self.group_size, bits=self.bits)
            )
        return hybrid_cache.make_turboquant_cache(model, self.tq_config())

    def bits_per_element(self, model: nn.Module) -> float:
        """Effective bits per K/V element over the compressed layers (fp16 side data)."""
        if self.kind == "fp":
            return 16.0
        if self.kind == "mlx":
            return self.bits + 2 * 16 / self.group_size
        return hybrid_cache.describe_model(model, self.tq_config()).bits_per_element


def parse_spec(spec: str) -> CacheSpec:
    """Parse one cache spec (see the module docstring)."""
    s = spec.strip()
    if s in ("fp", "fp16", "fp32"):
        return CacheSpec(s, "fp")
    if s.startswith("mlx"):
        body = s[3:]
        bits, _, group = body.partition("g")
        return CacheSpec(s, "mlx", bits=int(bits), group_size=int(group or 64))
    if not s.startswith("tq:"):
        raise ValueError(f"unknown cache spec {spec!r}")
    parts = s.split(":")[1:]
    opts: dict[str, Any] = {"quantizer": parts[0]}
    if parts[0] not in ("affine", "codebook"):
        raise ValueError(f"unknown quantizer in {spec!r}")
    side_quantizers = {"kchan": ("key_quantizer", "channel"), "kaff": ("key_quantizer", "affine")}
    side_quantizers |= {"kcb": ("key_quantizer", "codebook"), "vaff": ("value_quantizer", "affine")}
    side_quantizers |= {"vcb": ("value_quantizer", "codebook")}
    for p in parts[1:]:
        if p in side_quantizers:
            key, name = side_quantizers[p]
            opts[key] = name
        elif p[:1] in "sw" and p[1:].isdigit():
            opts["sink_tokens" if p[0] == "s" else "window"] = int(p[1:])
        elif p.startswith("k") and "v" in p:
            kb, vb = p[1:].split("v")
            opts["key_bits"], opts["value_bits"] = int(kb), int(vb)
        elif p.startswith("g"):
            opts["group_size"] = int(p[1:])
        elif p == "norot":
            opts["use_rotation"] = False
        elif p == "nonorm":
            opts["use_normalization"] = False
        elif p == "norm":
            opts["use_normalization"] = True
        elif p == "nocenter":
            opts["center_keys"] = False
        elif p.startswith("bb"):
            opts["boundary_bits"] = int(p[2:])
        elif p.startswith("b"):
            opts["boundary_layers"] = int(p[1:])
        else:
            raise ValueError(f"unknown option {p!r} in {spec!r}")
    return CacheSpec(s, "tq", bits=opts.get("key_bits", 4), options=opts)


# --------------------------------------------------------------------------- evaluation


def chunked_nll(
    model: nn.Module,
    tokens: Sequence[int],
    cache: list[Any],
    *,
    chunk: int = 64,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over ``tokens`` and their count.

    Tokens go through ``cache`` ``chunk`` at a time, so attention past the first chunk reads
    keys and values back from the cache.
    """
    ids = mx.array(list(tokens))
    total, count = 0.0, 0
    n = len(tokens) - 1
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        logits = model(ids[None, start:stop], cache=cache)[0].astype(mx.float32)
        targets = ids[start + 1 : stop + 1]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(logp, targets[:, None], axis=-1).sum()
        total += float(nll.item())
        count += stop - start
        if progress:
            progress(stop)
    return total, count


def perplexity(model: nn.Module, tokens: Sequence[int], spec: CacheSpec, chunk: int = 64) -> float:
    """Perplexity of ``model`` over ``tokens`` with a fresh cache built from ``spec``."""
    total, count = chunked_nll(model, tokens, spec.make(model), chunk=chunk)
    return math.exp(total / count)


def main(argv: Sequence[str] | None = None) -> int:
    """Print perplexity per cache spec for one model."""
    ap = argparse.ArgumentParser(prog="python -m bench.eval_ppl", description=main.__doc__)
    ap.add_argument("--model", required=True, help="mlx-lm model directory")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--caches", default="fp,mlx8,mlx4,tq:affine:k4v4,tq:codebook:k4v4")
    ap.add_argument(
        "--write",
        metavar="SECTION",
        help="also write the table to docs/benchmarks.md as section SECTION (first cache: fp)",
    )
    ns = ap.parse_args(argv)
    model, tok = load_float32(ns.model)
    tokens = text_tokens(tok, ns.tokens)
    base = None
    print(f"{'cache':40} {'bits/el':>8} {'ppl':>9} {'delta':>8} {'s':>6}")
    rows = []
    for name in ns.caches.split(","):
        spec = parse_spec(name)
        t0 = time.perf_counter()
        ppl = perplexity(model, tokens, spec, ns.chunk)
        base = base or ppl
        bits, delta = spec.bits_per_element(model), 100 * (ppl / base - 1)
        rows.append([f"`{spec.name}`", f"{bits:.3f}", f"{ppl:.3f}", f"{delta:+.2f} %"])
        print(
            f"{spec.name:40} {bits:8.3f} {ppl:9.3f} {delta:+7.2f}% {time.perf_counter() - t0:6.1f}",
            flush=True,
        )
    if ns.write:
        from bench.report import markdown_table, write_section

        body = (
            f"Perplexity over {ns.tokens:,} tokens of CPython's `pydoc_data/topics.py` prose, "
            f"{ns.chunk}-token chunks through a persistent cache (as in the KV cache configs "
            "section; Δppl against the first row of this run). bits/el per position of a long "
            "context (see that section for the full-precision positions).\n\n"
            + markdown_table(["cache", "bits/el", "ppl", "Δppl"], rows)
        )
        write_section(ns.write, f"KV cache perplexity ({Path(ns.model).name}, CPU)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
