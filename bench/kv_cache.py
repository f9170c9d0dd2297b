"""KV cache benchmark: size, perplexity, decode speed and peak memory per cache config.

One run measures every config on one model and writes one table (section ``kv_cache`` of
docs/benchmarks.md) plus a plot of perplexity vs bits per element (docs/kv_cache_ppl.png).

- bits/element and KV bytes/token: over the compressed (full-attention) layers, side data
  (scales, biases, norms) counted at float16, as they would be in an fp16 model.
- perplexity: ``bench.eval_ppl`` (Python Language Reference prose, 64-token chunks through a
  persistent cache, so attention really reads the cache under test).
- decode: tokens/s of single-token steps after prefilling to each context length, configs
  timed in interleaved rounds (best round kept); on CPU shown as a ratio to the ``fp`` row
  of the same run (absolute figures with ``--absolute``).
- peak memory: MLX peak above the memory in use before each prefill (256-token chunks).

Quick CPU run (1,024 tokens; about 15 minutes on 2 idle cores)::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
    python -m bench.kv_cache --model .cache/models/smollm2-135m-instruct

The run in docs/benchmarks.md (the issue's 4,096 tokens; about 40 minutes):
``--tokens 4096 --contexts 1024,2048,4096``; on a GPU
(MLX CUDA or Metal): ``--device gpu --absolute --contexts 4096,16384,32768``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from bench.eval_ppl import CacheSpec, chunked_nll, load_float32, parse_spec, text_tokens
from bench.report import markdown_table, write_section
from services import hybrid_cache

DOCS = Path(__file__).resolve().parent.parent / "docs"
PLOT = DOCS / "kv_cache_ppl.png"

DEFAULT_CONFIGS = [
    "fp",
    "mlx8",
    "mlx4",
    "mlx4g32",
    "tq:affine:k8v8",
    "tq:affine:k4v4",
    "tq:affine:k4v4:norot",
    "tq:affine:k4v4:nonorm",
    "tq:affine:k4v4:nocenter",
    "tq:affine:k3v3",
    "tq:codebook:k4v4",
    "tq:codebook:k3v3",
    # codebook sides above 4 bits are affine: K affine-5 + V codebook-3
    "tq:codebook:k5v3",
    # the full-precision sink and window, and keys per channel; the stack's default
    # (TurboQuantConfig.recommended()) is tq:affine:k4v4:kchan:g128:s1
    "tq:affine:k4v4:kchan:g128:s1",
    "tq:affine:k4v3:kchan:g128:s1",
    "tq:codebook:k4v4:kchan:g128:s1",
    "tq:codebook:k4v3:kchan:g128:s1",
    "tq:codebook:k3v3:kchan:g128:s1",
    "tq:codebook:k3v2:kchan:g128:s1",
    "tq:codebook:k4v4:kchan:g64:s1",
    "tq:codebook:k4v4:kchan:g128",
    "tq:codebook:k4v4:s1:w64",
    "tq:codebook:k4v4:s1",
]
SPEED_CONFIGS = [
    "fp",
    "mlx4",
    "tq:affine:k4v4",
    "tq:codebook:k4v4",
    "tq:affine:k4v4:kchan:g128:s1",
    "tq:codebook:k4v4:kchan:g128:s1",
]


@dataclass
class Result:
    """Every figure of one cache config."""

    spec: CacheSpec
    bits: float
    bytes_per_token: int
    bits_at: float = math.nan  # stored at the perplexity context, full-precision parts too
    ppl: float = math.nan
    decode_tps: dict[int, float] = field(default_factory=dict)
    peak_bytes: int | None = None
    cache_bytes: int | None = None
    error: str | None = None


def kv_bytes_per_token(model: nn.Module, spec: CacheSpec, fp16: int) -> int:
    """Stored KV bytes per token over the full-attention layers for ``spec``."""
    if spec.kind == "tq":
        return hybrid_cache.describe_model(model, spec.tq_config()).kv_bytes_per_token_compressed
    return round(fp16 * spec.bits_per_element(model) / 16)


def stored_bits(spec: CacheSpec, cache: list[Any], bits: float) -> float:
    """Bits per element the compressed layers hold now (full-precision parts at fp16);
    ``bits`` (the per-position figure) for caches without full-precision parts."""
    if spec.kind != "tq":
        return bits
    ours = [c for c in cache if type(c).__name__ == "TurboQuantKVCache"]
    used = sum(c.stored_nbytes(full_precision_bytes=2) for c in ours)
    return 16.0 * used / sum(c.fp16_nbytes for c in ours)


def _step(model: nn.Module, cache: list[Any], tok: mx.array, steps: int) -> float:
    """Seconds for ``steps`` greedy single-token decode steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = mx.argmax(model(tok, cache=cache)[:, -1:], axis=-1)
        mx.eval(tok)
    return time.perf_counter() - t0


def decode_speeds(
    model: nn.Module,
    results: list[Result],
    tokens: Sequence[int],
    contexts: Sequence[int],
    steps: int,
    rounds: int = 3,
) -> None:
    """Fill ``decode_tps``, ``peak_bytes`` and ``cache_bytes`` of ``results`` in place.

    All configs are prefilled to each context, then timed in interleaved rounds and the best
    round kept, so a burst of load from other processes skews no single config.
    """
    ids = mx.array(list(tokens))
    caches = [r.spec.make(model) for r in results]
    filled = [0] * len(results)
    peaks = [0] * len(results)
    for ctx in sorted(contexts):
        for i, cache in enumerate(caches):
            mx.synchronize()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            for start in range(filled[i], ctx, 256):
                mx.eval(model(ids[None, start : min(start + 256, ctx)], cache=cache))
            peaks[i] = max(peaks[i], mx.get_peak_memory() - base)
            filled[i] = ctx
            _step(model, cache, ids[None, ctx : ctx + 1], 1)  # warm-up (kernels, growth)
        best = [math.inf] * len(results)
        for _ in range(rounds):
            for i, cache in enumerate(caches):
                best[i] = min(best[i], _step(model, cache, ids[None, ctx : ctx + 1], steps))
        for i, r in enumerate(results):
            r.decode_tps[ctx] = steps / best[i]
            # Trim the timed steps away where possible, so the next context starts exact.
            if all(c.is_trimmable() for c in caches[i]):
                for c in caches[i]:
                    c.trim(c.offset - ctx)
            else:
                filled[i] = ctx + 1 + rounds * steps
    for r, cache, peak in zip(results, caches, peaks, strict=True):
        r.peak_bytes = peak
        r.cache_bytes = hybrid_cache.cache_memory(cache)["actual_bytes"]


def _fmt_ratio(r: Result, base: Result, ctx: int, absolute: bool) -> str:
    if ctx not in r.decode_tps:
        return "–"
    if absolute:
        return f"{r.decode_tps[ctx]:.1f}"
    return f"{r.decode_tps[ctx] / base.decode_tps[ctx]:.2f}x"


def goal_lines(results: list[Result]) -> list[str]:
    """The issue's quality goals checked against this run's figures (met or missed)."""
    base = next(r for r in results if r.spec.kind == "fp")
    ok = [r for r in results if not math.isnan(r.ppl)]
    ours = [r for r in ok if r.spec.kind == "tq"]

    def delta(r: Result) -> float:
        return 100 * (r.ppl / base.ppl - 1)

    lines = []
    for ratio, bits, limit in ((3.5, 16 / 3.5, 1.0), (5.0, 16 / 5.0, 5.0)):
        for label, count in (("per position", "bits"), ("as stored at this context", "bits_at")):
            fit = [r for r in ours if getattr(r, count) <= bits + 1e-9]
            head = f"- Δppl ≤ +{limit:g} % at ≥ {ratio}x (≤ {bits:.2f} bits {label})"
            if not fit:
                lines.append(f"{head}: no config of ours measured there.")
                continue
            best = min(fit, key=delta)
            verdict = "met" if delta(best) <= limit else "**missed**"
            lines.append(
                f"{head}: {verdict}; best `{best.spec.name}` {delta(best):+.2f} % at "
                f"{getattr(best, count):.3f} bits."
            )
    for m in (r for r in ok if r.spec.kind == "mlx"):
        fit = [r for r in ours if r.bits <= m.bits + 1e-9]
        if not fit:
            continue
        best = min(fit, key=delta)
        verdict = "better" if delta(best) < delta(m) else "**not better**"
        lines.append(
            f"- vs mlx-lm `{m.spec.name}` ({m.bits:.2f} bits, {delta(m):+.2f} %): {verdict}; "
            f"`{best.spec.name}` {delta(best):+.2f} % at {best.bits:.3f} bits."
        )
    return lines


ABLATIONS = [
    ("key centering", "tq:affine:k4v4:nocenter", "tq:affine:k4v4"),
    ("rotation", "tq:affine:k4v4:norot", "tq:affine:k4v4"),
    ("normalization (norm baking)", "tq:affine:k4v4:nonorm", "tq:affine:k4v4"),
    ("keys 4 -> 5 bits, values 4 -> 3", "tq:codebook:k4v4", "tq:codebook:k5v3"),
    ("keys per channel, 1 sink position", "tq:codebook:k4v4", "tq:codebook:k4v4:kchan:g128:s1"),
    ("keys per channel, 1 sink position (affine)", "tq:affine:k4v4", "tq:affine:k4v4:kchan:g128:s1"),
    ("the sink position (keys per channel)", "tq:codebook:k4v4:kchan:g128",
     "tq:codebook:k4v4:kchan:g128:s1"),
    ("a 64-position window (keys per vector)", "tq:codebook:k4v4:s1", "tq:codebook:k4v4:s1:w64"),
    ("keys per channel vs a 64-position window", "tq:codebook:k4v4:s1:w64",
     "tq:codebook:k4v4:kchan:g128:s1"),
]  # fmt: skip


def ablation_lines(results: list[Result]) -> list[str]:
    """One line per on/off pair present in this run: Δppl without -> with."""
    base = next(r for r in results if r.spec.kind == "fp")
    by = {r.spec.name: r for r in results if not math.isnan(r.ppl)}
    lines = []
    for label, off, on in ABLATIONS:
        if off in by and on in by:
            a, b = (100 * (by[n].ppl / base.ppl - 1) for n in (off, on))
            lines.append(
                f"- {label}: `{off}` {a:+.2f} % ({by[off].bits:.2f} bits) -> "
                f"`{on}` {b:+.2f} % ({by[on].bits:.2f} bits)"
            )
    return lines


def render(
    results: list[Result], contexts: Sequence[int], absolute: bool, model_name: str, tokens: int
) -> str:
    """The markdown body of the section."""
    base = next(r for r in results if r.spec.kind == "fp")
    fp16_bytes = base.bytes_per_token
    unit = "tok/s" if absolute else "× fp"
    headers = [
        "model", "cache", "bits/el", f"bits @{tokens}", "KV B/token", "vs fp16", "ppl", "Δppl",
        *[f"decode @{c} ({unit})" for c in contexts], "peak MiB", "cache MiB",
    ]  # fmt: skip
    rows = []
    for r in results:
        delta = "–" if math.isnan(r.ppl) else f"{100 * (r.ppl / base.ppl - 1):+.2f} %"
        rows.append([
            model_name,
            f"`{r.spec.name}`" + (f" (error: {r.error})" if r.error else ""),
            f"{r.bits:.3f}",
            f"{r.bits_at:.3f}",
            f"{r.bytes_per_token:,}",
            f"{fp16_bytes / r.bytes_per_token:.2f}x",
            "–" if math.isnan(r.ppl) else f"{r.ppl:.3f}",
            delta,
            *[_fmt_ratio(r, base, c, absolute) if base.decode_tps else "–" for c in contexts],
            "–" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}",
            "–" if r.cache_bytes is None else f"{r.cache_bytes / 2**20:.1f}",
        ])  # fmt: skip
    notes = (
        f"Perplexity over {tokens:,} tokens of CPython's `pydoc_data/topics.py` prose, 64-token "
        "chunks through a persistent cache; `fp` is the model-dtype `KVCache` (float32 here), "
        "listed at 16 bits as the fp16 reference for sizes. bits/el and KV B/token count only "
        "the compressed layers, side data at fp16 (mlx-lm's cache stores it in the model "
        "dtype), per position of a long context; bits @N is what the caches held at the end "
        "of the perplexity run, the full-precision sink (`sN`), window (`wN`) and not yet "
        "quantized group of per-channel keys (`kchan`, up to g-1 positions) counted at fp16. "
        "Decode: configs timed in interleaved rounds, best of 3 kept. Peak MiB: MLX "
        "peak above the memory in use before each prefill step (256-token chunks); cache MiB: "
        f"cache `nbytes` at the longest context. Specs: see `bench/eval_ppl.py`.\n\n"
        f"![perplexity vs bits per element]({PLOT.name})\n"
    )
    goals = "Goals of issue #3, checked on this run:\n\n" + "\n".join(goal_lines(results)) + "\n"
    ablations = ablation_lines(results)
    if ablations:
        goals += "\nWhat each option does here (same run):\n\n" + "\n".join(ablations) + "\n"
    return notes + "\n" + markdown_table(headers, rows) + "\n" + goals


def plot(results: list[Result], path: Path, model_name: str) -> None:
    """Scatter of perplexity vs bits per element, ours vs mlx-lm, fp as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    base = next(r for r in results if r.spec.kind == "fp")
    ax.axhline(base.ppl, color="grey", ls="--", lw=1, label=f"fp cache ({base.ppl:.3f})")
    ax.axhline(base.ppl * 1.01, color="green", ls=":", lw=1, label="+1 %")
    ax.axhline(base.ppl * 1.05, color="orange", ls=":", lw=1, label="+5 %")
    styles = {"mlx": ("tab:red", "s", "mlx-lm QuantizedKVCache"),
              "tq:affine": ("tab:blue", "o", "TurboQuant affine"),
              "tq:codebook": ("tab:purple", "^", "TurboQuant codebook"),
              "tq:kchan": ("tab:green", "D", "TurboQuant, keys per channel")}  # fmt: skip
    seen = set()
    for r in results:
        if r.spec.kind == "fp" or math.isnan(r.ppl):
            continue
        key = "mlx" if r.spec.kind == "mlx" else f"tq:{r.spec.options['quantizer']}"
        if r.spec.options.get("key_quantizer") == "channel":
            key = "tq:kchan"
        color, marker, label = styles[key]
        ax.scatter(r.bits, r.ppl, c=color, marker=marker,
                   label=None if key in seen else label)  # fmt: skip
        seen.add(key)
        ax.annotate(r.spec.name.removeprefix("tq:"), (r.bits, r.ppl), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("effective bits per K/V element")
    ax.set_ylabel("perplexity")
    top = max(r.ppl for r in results if not math.isnan(r.ppl))
    ax.set_ylim(base.ppl * 0.99, min(top * 1.02, base.ppl * 1.4))
    ax.set_title(f"{model_name}: perplexity vs KV cache bits")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write docs/benchmarks.md (section kv_cache) and the plot."""
    ap = argparse.ArgumentParser(prog="python -m bench.kv_cache", description=main.__doc__)
    ap.add_argument("--model", default=".cache/models/smollm2-135m-instruct")
    ap.add_argument("--name", help="model name in the table (default: directory name)")
    ap.add_argument("--tokens", type=int, default=1024, help="perplexity tokens")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--speed", default=",".join(SPEED_CONFIGS),
                    help="configs timed for decode ('all' or a list)")  # fmt: skip
    ap.add_argument("--contexts", default="256,1024,2048", help="decode context lengths")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per context")
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None)
    ap.add_argument("--absolute", action="store_true", help="tokens/s instead of ratios")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ns = ap.parse_args(argv)

    if ns.device:
        mx.set_default_device(mx.gpu if ns.device == "gpu" else mx.cpu)
    model, tok = load_float32(ns.model)
    name = ns.name or Path(ns.model).name
    contexts = [int(c) for c in ns.contexts.split(",") if c]
    specs = [parse_spec(s) for s in ns.configs.split(",") if s]
    timed = {s.name for s in specs} if ns.speed == "all" else set(ns.speed.split(","))
    need = max(ns.tokens, max(contexts) + 2)
    tokens = text_tokens(tok, need)
    fp16 = hybrid_cache.describe_model(model, parse_spec("tq:affine:k4v4").tq_config())
    fp16_bytes = fp16.kv_bytes_per_token_fp16

    results = []
    for spec in specs:
        t0 = time.perf_counter()
        r = Result(spec, spec.bits_per_element(model), kv_bytes_per_token(model, spec, fp16_bytes))
        try:
            cache = spec.make(model)
            total, count = chunked_nll(model, tokens[: ns.tokens], cache)
            r.ppl = math.exp(total / count)
            r.bits_at = stored_bits(spec, cache, r.bits)
        except Exception as e:  # one broken config must not lose the whole run
            r.error = f"{type(e).__name__}: {e}"[:120]
        results.append(r)
        print(f"{spec.name:28} bits {r.bits:6.3f} ppl {r.ppl:8.3f} "
              f"({time.perf_counter() - t0:.0f}s) {r.error or ''}", flush=True)  # fmt: skip
    speed = [r for r in results if r.spec.name in timed and r.error is None]
    if speed:
        decode_speeds(model, speed, tokens, contexts, ns.steps)
        for r in speed:
            tps = " ".join(f"{c}:{v:.2f}" for c, v in r.decode_tps.items())
            print(f"{r.spec.name:28} decode tok/s {tps} peak {r.peak_bytes}", flush=True)

    body = render(results, contexts, ns.absolute, name, ns.tokens)
    print(body)
    if not ns.no_write:
        plot(results, PLOT, name)
        dev = "GPU" if ns.device == "gpu" else "CPU"
        write_section("kv_cache", f"KV cache configs ({name}, {dev})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
