"""End-to-end decode speed and KV memory: fp16 KVCache vs the TurboQuant cache.

Random-weight models with the real shapes of Llama-3.1-8B and Qwen3.5-35B-A3B (hybrid:
10 of 40 layers hold KV) are built on the device, their attention caches are filled
with ``context`` random tokens' keys/values (no prefill needed for decode speed), then
``steps`` greedy decode steps are timed. KV memory is *measured*: active device memory
after filling the caches minus before. On the GPU machine:

    python bench/e2e_decode_gpu.py --out $OUT            # writes e2e_decode_gpu.json

and back here ``--render e2e_decode_gpu.json --machine ... --command ...`` writes the
"e2e_decode_gpu" section of docs/benchmarks.md. ``--tiny`` runs scaled-down shapes on any
machine (a smoke test of the plumbing, not a benchmark).

Results and their caveats: docs/benchmarks.md ("End-to-end decode on the GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import add_section_args, tune_arg  # noqa: E402

# Public config.json shapes (text part).
LLAMA_31_8B = dict(
    model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
)  # fmt: skip
QWEN35_35B_A3B = dict(
    model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, rms_norm_eps=1e-6,
    vocab_size=248320, full_attention_interval=4, linear_num_key_heads=16,
    linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8,
    moe_intermediate_size=512, shared_expert_intermediate_size=512,
    tie_word_embeddings=False, max_position_embeddings=262144,
    rope_parameters={"type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
)  # fmt: skip
# Llama-3.1-8B's attention (and its projections) with a token's MLP and vocabulary: ~0.16 of
# its weights' bytes a step -- whether our kernel's in-model stage times come from the
# weights' traffic (bench/gpu_notes.md, session 25). Timing experiments only.
LLAMA_LEAN = dict(LLAMA_31_8B, intermediate_size=256, vocab_size=512)
MODELS = {"llama-3.1-8b": LLAMA_31_8B, "llama-3.1-8b-lean": LLAMA_LEAN,
          "qwen3.5-35b-a3b": QWEN35_35B_A3B}  # fmt: skip
# Cache kinds besides fp16: the stack's default layout (per-channel keys, a full-precision
# sink; the portable quantized_matmul path) and the paper's plain layout (every position
# quantized per vector: the layout the fused CUDA kernel takes).
# tq-fused / tq-unfused: the default layout with the CUDA kernel's join forced into the
# split launch or left to a second one (mma_decode.FUSED_JOIN), to compare in one run.
# tq-nowrite: an experiment, not a cache -- the default layout with a decode step's new
# position never written (neither by MLX ops nor by the kernel: its attention reads stale
# tail positions): what the write costs a step, timing only.
# tq-cut: the default cache with a decode step's tail views cut every step (two slice ops a
# layer), as before the sides carried the tail buffer (cache.BufferedTail, session 17).
# tq-mlxrope: the default cache with a decode step's RoPE left to MLX ops (two a layer), as
# before the layer kernel applied it (rope_fusion, session 18).
CACHE_KINDS = ("fp16", "tq-default", "tq-plain", "tq-fused", "tq-unfused", "tq-nowrite",
               "tq-cut", "tq-mlxrope")  # fmt: skip
JOIN_MODES = {"tq-fused": dict(FUSED_JOIN=True, FUSED_MAX_WORK=None),
              "tq-unfused": dict(FUSED_JOIN=False)}  # fmt: skip


def _tq_config(kind: str):
    from services.turboquant import TurboQuantConfig

    if kind == "tq-plain":
        return TurboQuantConfig(key_bits=4, value_bits=4)
    return TurboQuantConfig.recommended()


@contextlib.contextmanager
def join_mode(kind: str, model=None):
    """``kind``'s join (JOIN_MODES) while its steps run; the module's default otherwise.
    With ``model``: fp16 runs with the model's own ropes (no rope_fusion wrapper: an
    fp16 stack would have none), tq-mlxrope with the wrappers off."""
    from bench.host_time import rope_mode
    from services.turboquant.kernels import mma_decode

    mode = JOIN_MODES.get(kind, {})
    saved = {k: getattr(mma_decode, k) for k in mode}
    for k, v in mode.items():
        setattr(mma_decode, k, v)
    how = "model" if kind == "fp16" else "mlx" if kind == "tq-mlxrope" else "kernel"
    try:
        with rope_mode(model, how):
            yield
    finally:
        for k, v in saved.items():
            setattr(mma_decode, k, v)


TINY = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=256, vocab_size=512)


def build(name: str, tiny: bool, weight_bits: int | None = None):
    """A float16 random-weight model with ``name``'s shapes (smaller ones with ``tiny``);
    ``weight_bits``: its linear layers quantized as mlx-community's checkpoints are (group 64)."""
    import mlx.core as mx
    import mlx.nn as nn

    if name not in MODELS:
        raise ValueError(f"--models: one of {', '.join(MODELS)}")
    if MODELS[name]["model_type"] == "llama":
        from mlx_lm.models import llama

        cfg = dict(MODELS[name], **(TINY if tiny else {}))
        model = llama.Model(llama.ModelArgs(**cfg))
    else:
        from mlx_lm.models import qwen3_5_moe

        cfg = dict(QWEN35_35B_A3B)
        if tiny:
            cfg.update(TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=64, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=32,
                       linear_value_head_dim=32)  # fmt: skip
        model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs(model_type="qwen3_5_moe", text_config=cfg))
    # float16 like a real checkpoint; --tiny stays float32 (MLX's CPU GatherMM needs it).
    model.set_dtype(mx.float32 if tiny else mx.float16)
    if weight_bits:
        nn.quantize(model, group_size=64, bits=weight_bits)
    mx.eval(model.parameters())
    model.eval()
    return model


def fill(cache: list, context: int, batch: int = 1) -> None:
    """Put ``context`` random tokens' keys/values (``batch`` sequences) into every
    attention cache of the list."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from services.turboquant import TurboQuantKVCache

    for c in cache:
        if isinstance(c, (KVCache, TurboQuantKVCache)) and hasattr(c, "_bench_shape"):
            n_kv, d = c._bench_shape
            # In chunks: a 128K-token fp32 temporary for all heads would dwarf the cache.
            for start in range(0, context, 8192):
                n = min(8192, context - start)
                k = mx.random.normal((batch, n_kv, n, d)).astype(mx.float16)
                v = mx.random.normal((batch, n_kv, n, d)).astype(mx.float16)
                c.update_and_fetch(k, v)
                mx.eval(list(c.state))


def attention_shapes(model, cache: list) -> None:
    """Tag each attention cache with its layer's (kv heads, head dim)."""
    from mlx_lm.models.cache import KVCache

    from services.turboquant import TurboQuantKVCache

    args = getattr(model, "language_model", model).args
    n_kv = args.num_key_value_heads
    d = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    for c in cache:
        if isinstance(c, (KVCache, TurboQuantKVCache)):
            c._bench_shape = (n_kv, d)


def decode_rate(model, cache: list, steps: int, host: dict | None = None, batch: int = 1) -> float:
    """Greedy decode tokens/s over ``steps`` steps of ``batch`` sequences (all of them
    counted), pipelined as ``mlx_lm.generate`` does (the next step's graph is built while
    the GPU runs the current one). ``host``: gets the seconds a step spends building its
    graph, dispatching it (``async_eval``: MLX encodes every kernel on this thread) and
    waiting for the previous step."""
    parts, wall = _timed_steps(model, cache, steps, batch, pipelined=True)
    if host is not None:
        host.update({k: sum(p[i] for p in parts) / steps for i, k in enumerate(PARTS)})
    return steps * batch / wall


def step_costs(model, cache: list, steps: int, batch: int = 1) -> dict:
    """Median ms a step spends building its graph, dispatching it and then waiting for the
    GPU, each step started on an idle GPU (not pipelined): the host's own cost, which
    ``decode_rate``'s dispatch can hide (there MLX may block on a GPU a step behind)."""
    parts, _ = _timed_steps(model, cache, steps, batch, pipelined=False)
    return {k: round(statistics.median(p[i] for p in parts) * 1e3, 3) for i, k in enumerate(PARTS)}


PARTS = ("build", "dispatch", "wait")


def profile_builds(model, cache: list, steps: int, batch: int, top: int) -> str:
    """cProfile of ``steps`` decode steps' graph builds alone (each step evaluated outside
    the profile): the ``top`` functions by own time, MLX's C++ calls among them -- where a
    cache's build time goes on this host."""
    import cProfile
    import io
    import pstats

    import mlx.core as mx

    tok = mx.ones((batch, 1), dtype=mx.int32)
    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        tok = _step(model, cache, tok)
        prof.disable()
        mx.eval(tok)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


_CALLS: dict | None = None  # (cache, "update" | "attention") -> seconds; None: not wrapped yet


def call_times(model, cache: list, steps: int, batch: int) -> dict:
    """Microseconds a layer of ``steps`` decode steps' builds, medians over the steps (each
    evaluated outside the timing): the whole step, and the cache update and attention calls
    inside the model (bench.host_time.time_calls' timers) -- where the build goes, with the
    real kernels, without a profiler's per-call cost."""
    import mlx.core as mx

    from bench.host_time import time_calls

    global _CALLS
    if _CALLS is None:
        _CALLS = {}
        time_calls(_CALLS)
    layers = len(cache)
    tok = mx.ones((batch, 1), dtype=mx.int32)
    for _ in range(4):  # (warm)
        tok = _step(model, cache, tok)
        mx.eval(tok)
    rows = []  # per step: the whole build, then each timer's share
    for _ in range(steps):
        _CALLS.clear()  # (the timers add their keys back as they run)
        t = time.perf_counter()
        tok = _step(model, cache, tok)
        step = {"step": time.perf_counter() - t}
        step.update((" ".join(k), v) for k, v in _CALLS.items())
        rows.append(step)
        mx.eval(tok)
    # medians over steps: a block's step (its quantization, a wait for the GPU) is 1 in 128
    return {k: round(statistics.median(r.get(k, 0.0) for r in rows) * 1e6 / layers, 1)
            for k in rows[-1]}  # fmt: skip


def _step(model, cache: list, tok):
    """One greedy decode step's graph (built, not evaluated): the next tokens."""
    import mlx.core as mx

    return mx.argmax(model(tok, cache=cache)[:, -1:, :], axis=-1)


def _timed_steps(model, cache: list, steps: int, batch: int, pipelined: bool):
    """Each step's (build, dispatch, wait) seconds and the loop's wall time. Pipelined: the
    wait is for the previous step, whose GPU work ran meanwhile; else each step starts on an
    idle GPU and waits for itself."""
    import mlx.core as mx

    tok = mx.ones((batch, 1), dtype=mx.int32)
    if pipelined:
        tok = _step(model, cache, tok)
        mx.async_eval(tok)
    parts = []
    t = time.perf_counter()
    for _ in range(steps):
        if not pipelined:
            mx.eval(tok)
        t0 = time.perf_counter()
        nxt = _step(model, cache, tok)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        mx.eval(tok if pipelined else nxt)
        parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        tok = nxt
    mx.eval(tok)
    return parts, time.perf_counter() - t


def _views_only(self, buf: tuple, k, v, t: int, n: int) -> int:
    """TurboQuantKVCache._append_in_buffer without its two slice updates (tq-nowrite)."""
    return self._cut_tail(buf, t + n)


def _filled_cache(model, kind: str, context: int, batch: int):
    """A ``kind`` cache holding ``context`` random tokens, and the device bytes it took."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from services.turboquant import make_turboquant_cache

    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    if kind == "fp16":
        cache = make_prompt_cache(model)
    else:
        cache = make_turboquant_cache(model, _tq_config(kind))
    attention_shapes(model, cache)
    fill(cache, context, batch)
    if kind == "tq-cut":
        for c in cache:
            if hasattr(c, "BUFFERED_TAIL"):
                c.BUFFERED_TAIL = False
    if kind == "tq-nowrite":
        for c in cache:
            if hasattr(c, "_append_in_buffer"):
                c.KERNEL_WRITES_TAIL = False  # (else the kernel writes them: TailAppend)
                c._append_in_buffer = _views_only.__get__(c)
    mx.synchronize()
    return cache, mx.get_active_memory() - before


def warm_kernels(model, kind: str) -> None:
    """On CUDA, every decode-kernel variant ``kind``'s caches reach, built as the sidecar
    builds them at load (kernels/warm.py): a variant first reached inside a timed round
    (a block's step, one launch a layer becoming two) compiled there on a fresh machine
    (session 20: a Qwen3.5 4K round at 5.1 tok/s). MLX keeps them on disk: seconds once."""
    from services.turboquant import make_turboquant_cache
    from services.turboquant.kernels.fused_decode import cuda_available
    from services.turboquant.kernels.warm import warm_model

    if not cuda_available():
        return
    config = _tq_config(kind)
    try:
        warm_model(model, lambda: make_turboquant_cache(model, config), config, list(range(1, 33)))
    except Exception as e:  # a bench, not the product: time on, unwarmed, and say so
        print(f"kernel warm-up failed ({type(e).__name__}: {e}); rounds may include compiles")


def run_context(model, kinds: list[str], context: int, steps: int, repeats: int = 2,
                batch: int = 1, profile: int = 0, calls: int = 0,
                warmed: set | None = None) -> list[dict]:  # fmt: skip
    """One row per cache kind: decode tok/s (median of ``repeats`` runs; ``batch``
    sequences, all counted), measured KV bytes and peak memory. All caches are filled
    first and their timed runs alternate (fp16, ours, fp16, ours, ...): the device's host
    is shared and its speed drifts by tens of percent within a minute (session 7), so
    ``vs_first`` is the median of each round's ratio to the first kind, not a ratio of
    medians taken minutes apart. ``warmed``: the kinds whose kernels were already built for
    this model (their warm-up is context-free: one a model, not one a context), updated."""
    import mlx.core as mx

    caches = {kind: _filled_cache(model, kind, context, batch) for kind in kinds}
    total_kv = sum(b for _, b in caches.values())
    warmed = set() if warmed is None else warmed
    for kind in kinds:
        if kind != "fp16" and kind not in warmed:
            with join_mode(kind, model):
                warm_kernels(model, kind)
            warmed.add(kind)
    for kind, (cache, _) in caches.items():
        with join_mode(kind, model):
            decode_rate(model, cache, 3, batch=batch)  # warm-up (kernel compiles, graph caches)
    runs = {kind: [] for kind in kinds}
    host = {kind: [] for kind in kinds}
    unpiped = {kind: [] for kind in kinds}
    peak = {kind: 0 for kind in kinds}
    for _ in range(repeats):
        for kind, (cache, kv) in caches.items():
            mx.synchronize()
            mx.reset_peak_memory()
            with join_mode(kind, model):
                host[kind].append({})
                runs[kind].append(decode_rate(model, cache, steps, host[kind][-1], batch))
                unpiped[kind].append(step_costs(model, cache, max(4, steps // 4), batch))
            # As if alone: the other caches' buffers sit in memory, unchanged, meanwhile.
            peak[kind] = max(peak[kind], mx.get_peak_memory() - (total_kv - kv))
    for kind, (cache, _) in caches.items() if profile else ():
        with join_mode(kind, model):
            print(f"== build profile: {kind}\n" + profile_builds(model, cache, 16, batch, profile))
    for kind, (cache, _) in caches.items() if calls else ():
        with join_mode(kind, model):
            print(f"== build a layer (us): {kind} {call_times(model, cache, calls, batch)}")
    rows = []
    for kind, (_, kv) in caches.items():
        ratios = [a / b for a, b in zip(runs[kind], runs[kinds[0]], strict=True)]
        rows.append(dict(cache=kind, context=context, batch=batch,
                         tok_s=statistics.median(runs[kind]), tok_s_runs=runs[kind],
                         vs_first=statistics.median(ratios), kv_bytes=int(kv),
                         peak_bytes=int(peak[kind]),
                         host_ms={k: round(statistics.median(h[k] for h in host[kind]) * 1e3, 3)
                                  for k in host[kind][0]},
                         unpipelined_ms={k: round(statistics.median(u[k] for u in unpiped[kind]), 3)
                                         for k in unpiped[kind][0]}))  # fmt: skip
    del caches
    mx.clear_cache()
    return rows


def render(path: str, machine: str | None, command: str | None, note: str = "",
           section: str = "e2e_decode_gpu", title: str = "End-to-end decode on the GPU") -> None:  # fmt: skip
    """Write the e2e_decode_gpu section (or ``section``) of docs/benchmarks.md from results
    JSONs; several files go into one table, each file's rows apart (column "process": the
    same rows measured in another process are another sample, not a duplicate)."""
    from bench.report import context_label, markdown_table, write_section

    files = [json.loads(Path(p).read_text()) for p in path.split(",")]
    res = dict(files[0], rows=[dict(r, process=i + 1) for i, f in enumerate(files)
                               for r in f["rows"]])  # fmt: skip

    def key(r):
        return (r["model"], r.get("weight_bits", 16), r.get("batch", 1), r["process"],
                r["cache"], r["context"])  # fmt: skip

    rows, by = [], {key(r): r for r in res["rows"]}
    for (model, wbits, batch, proc, kind, ctx), r in sorted(by.items()):
        base = by.get((model, wbits, batch, proc, "fp16", ctx))
        runs = "/".join(f"{x:.1f}" for x in r.get("tok_s_runs", []))
        host = r.get("host_ms")
        host = f"{host['build']:.2f} / {host['dispatch']:.2f} / {host['wait']:.2f}" if host else "-"
        alone = r.get("unpipelined_ms")
        alone = (
            "-"
            if not alone
            else f"{alone['build']:.2f} / {alone['dispatch']:.2f} / {alone['wait']:.2f}"
        )
        rows.append([model, "fp16" if wbits == 16 else f"{wbits}-bit", batch, proc, context_label(ctx), kind, f"{r['tok_s']:.1f}", runs or "-",
                     f"{r.get('vs_first', r['tok_s'] / base['tok_s']):.2f}x" if base else "-",
                     f"{r['kv_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / 2**30:.1f}", host, alone])  # fmt: skip
    head = ["model", "weights", "batch", "process", "context", "cache", "decode tok/s (all sequences)", "runs",
            "vs fp16 (paired runs)", "KV MiB (measured)", "peak GiB", "host ms a step: build / dispatch / wait",
            "a step alone (GPU idle first): build / dispatch / wait ms"]  # fmt: skip
    body = f"MLX {res['mlx']}, {res['gpu']}.\n\n" + (note + "\n\n" if note else "")
    body += markdown_table(head, rows)
    write_section(section, title, body, machine=machine or res["gpu"], command=command)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default="llama-3.1-8b,qwen3.5-35b-a3b")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    ap.add_argument("--caches", default=",".join(CACHE_KINDS))
    ap.add_argument("--tiny", action="store_true", help="scaled-down shapes (smoke test)")
    ap.add_argument("--split-factor", type=int, help="blocks per SM of the CUDA decode kernel")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--tune", type=tune_arg, default={}, help="mma_decode tunables: WARPS=8,...")
    ap.add_argument("--weight-bits", type=int, help="quantize the weights (4: as MLX users run)")
    ap.add_argument("--profile", type=int, default=0, help="print each cache's top N build costs")
    ap.add_argument(
        "--calls",
        type=int,
        default=0,
        help="then N steps each with the update and attention calls timed (printed)",
    )
    add_section_args(ap, "result JSONs (comma-separated) to write into the docs")
    ap.add_argument("--section", default="e2e_decode_gpu", help="the docs section --render writes")
    ap.add_argument("--title", default="End-to-end decode on the GPU", help="its heading")
    args = ap.parse_args()
    if args.render:
        render(args.render, args.machine, args.command, args.note, args.section, args.title)
        return

    import mlx.core as mx

    settings = {"SPLIT_FACTOR": args.split_factor} if args.split_factor else {}
    if settings or args.tune:
        from services.turboquant.kernels import mma_decode

        mma_decode.tune(**{**settings, **args.tune})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"mlx": mx.__version__, "gpu": str(mx.default_device()), "rows": [],
           "split_factor": args.split_factor, "weight_bits": args.weight_bits,
           "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")}}  # fmt: skip
    try:
        import subprocess

        res["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()  # fmt: skip
    except (OSError, Exception):  # noqa: BLE001 - no GPU tool on this machine
        pass
    for name in args.models.split(","):
        model = build(name, args.tiny, args.weight_bits)
        warmed = set()  # (once a model: session 22's two-context Qwen3.5 process warmed twice)
        for ctx in (int(c) for c in args.contexts.split(",")):
            kinds = sorted(args.caches.split(","), key=lambda k: k != "fp16")  # fp16 first
            for row in run_context(
                model, kinds, ctx, args.steps, args.repeats, args.batch, args.profile, args.calls,
                warmed=warmed,
            ):  # fmt: skip
                res["rows"].append(dict(model=name, weight_bits=args.weight_bits or 16, **row))
                print(json.dumps(res["rows"][-1]), flush=True)
            (out / "e2e_decode_gpu.json").write_text(json.dumps(res, indent=1))
        del model
        mx.clear_cache()


if __name__ == "__main__":
    main()
