"""Host time of one decode step's graph (built, not evaluated): mlx-lm's KVCache + SDPA vs
the TurboQuant cache with the CUDA decode kernels hooked in, on any machine.

``mx.fast.cuda_kernel`` is replaced by a stand-in that returns zeros of the requested
shapes, so what is timed is the Python and graph building of a decode step -- the part
that runs on the CPU while the GPU works on the previous step (``mlx_lm.generate``
pipelines the two, so when it is longer than the GPU's share it sets the speed). MLX's own
per-launch costs of a real custom kernel (rebuilding and hashing its source) are not in
it. Steps of the two caches alternate; medians per step and per layer::

    python bench/host_time.py --write   # SmolLM2 f32 from .cache/models; the section too
    python bench/host_time.py --profile 20     # where our share of it goes (cProfile)
    python bench/host_time.py --calls          # per layer: cache update vs attention call
    python bench/host_time.py --cut            # + ours with the tail views cut every step
    python bench/host_time.py --mlxrope        # + ours with the step's RoPE by MLX ops
    python bench/host_time.py --opcodes 4      # Python opcodes a layer: ours vs the model's

Timed medians move by +-5 us a layer on a shared 2-core VM; the opcode count (``sys.settrace``
with ``f_trace_opcodes``) does not, and inside the model it tracks our time better than
micro-benchmarks of each call, which run warm (bench/gpu_notes.md, session 19).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class StandInKernel:
    """``mx.fast.cuda_kernel`` stand-in: each launch returns zeros of its output shapes."""

    def __init__(self, **_):
        pass

    def __call__(self, *, inputs, grid, threadgroup, output_shapes, output_dtypes,
                 template=None, init_value=None):  # fmt: skip
        import mlx.core as mx

        return [mx.zeros(s, dtype=t) for s, t in zip(output_shapes, output_dtypes, strict=True)]


class CachedStandInKernel(StandInKernel):
    """A stand-in whose outputs are made once per shape and evaluated: a launch adds no graph
    node, so a chain of layers times only the Python around the kernels."""

    made: dict = {}

    def __call__(self, *, inputs, grid, threadgroup, output_shapes, output_dtypes,
                 template=None, init_value=None):  # fmt: skip
        import mlx.core as mx

        key = (tuple(map(tuple, output_shapes)), tuple(output_dtypes))
        if key not in self.made:
            self.made[key] = super().__call__(inputs=inputs, template=template, grid=grid,
                                              threadgroup=threadgroup, output_shapes=output_shapes,
                                              output_dtypes=output_dtypes)  # fmt: skip
            mx.eval(self.made[key])
        return self.made[key]


def hook_kernels(kernel_cls: type = StandInKernel) -> None:
    """Install the CUDA layer/body kernels as on a GPU, launching stand-ins."""
    import mlx.core as mx

    from services.turboquant.attention import set_body_decode_kernel, set_layer_decode_kernel
    from services.turboquant.kernels import dispatch, mma_decode

    mma_decode.clear_kernel_caches()
    mx.fast.cuda_kernel = kernel_cls
    set_layer_decode_kernel(dispatch.mma_layer_kernel)
    set_body_decode_kernel(dispatch.mma_body_kernel)


def with_join_workspaces(cache_list: list) -> list:
    """Give each TurboQuant cache layer the join workspace it gets on CUDA (where it is made),
    so its decode takes the kernel path of a GPU: one launch a layer (mma_decode.FUSED_JOIN)."""
    from services.turboquant import cache as cache_mod

    for c in cache_list:
        if isinstance(c, cache_mod.TurboQuantKVCache):
            cache_mod._JOIN_WORKSPACES[c] = cache_mod.JoinWorkspace()
    return cache_list


def time_calls(acc: dict) -> None:
    """Wrap each cache's ``update_and_fetch`` and attention call with timers summed into
    ``acc`` (``update``/``attention`` of ``fp16`` and ``ours``): where a layer's host time
    goes inside the model, not in a micro-benchmark."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    import services.turboquant.patch as patch
    from services.turboquant import TurboQuantKVCache

    def timed(fn, key):
        def call(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
            return out

        return call

    KVCache.update_and_fetch = timed(KVCache.update_and_fetch, ("fp16", "update"))
    TurboQuantKVCache.update_and_fetch = timed(
        TurboQuantKVCache.update_and_fetch, ("ours", "update")
    )
    patch.turboquant_attention = timed(patch.turboquant_attention, ("ours", "attention"))
    mx.fast.scaled_dot_product_attention = timed(
        mx.fast.scaled_dot_product_attention, ("fp16", "attention")
    )


def count_opcodes(model, cache, steps: int) -> dict:
    """Python opcodes and calls a layer while ``steps`` decode steps build, split into ours
    (frames in services/turboquant) and the rest (the model's own code, mlx.nn, and the
    little Python ours calls elsewhere: a dataclass's generated hash)."""
    import mlx.core as mx

    n = {"ours": 0, "other": 0, "ours calls": 0}

    def tracer(frame, event, _arg):
        name = frame.f_code.co_filename
        if "/bench/" in name:  # the stand-in kernel: a real launch runs no Python
            return None
        ours = "services/turboquant" in name
        if event == "call":
            frame.f_trace_opcodes = True
            n["ours calls"] += ours
        elif event == "opcode":
            n["ours" if ours else "other"] += 1
        return tracer

    layers = sum(1 for c in cache if hasattr(c, "key_spec"))
    y = mx.array([[1]])
    for _ in range(steps):
        sys.settrace(tracer)
        try:
            logits = model(y, cache=cache)
        finally:
            sys.settrace(None)
        mx.eval(logits, [stored_arrays(c) for c in cache])
    return {k: v / (steps * layers) for k, v in n.items()}


def stored_arrays(c) -> list:
    """What a cache layer stores, to evaluate between steps: ours read without ``state``,
    which settles the step and cuts the tail (a decode loop never reads it, and the next
    step would then take the checked path, not the armed one)."""
    if not hasattr(c, "key_spec"):
        return list(c.state)
    buf = c._tail_buf
    return [*(c.keys or ()), *(c.values or ()), *(buf[:2] if buf is not None else ())]


@contextlib.contextmanager
def rope_mode(model, how: str):
    """The decode step's RoPE while the block runs, then as before: ``"kernel"`` (as set up:
    rope_fusion's wrappers hand it to the layer kernel), ``"mlx"`` (the wrappers pass it to
    MLX's op) or ``"model"`` (the model's own ropes, no wrapper: a stack without TurboQuant
    has none; ``model`` None: nothing to unwrap)."""
    from services.turboquant import rope_fusion

    takes = rope_fusion.kernel_takes_rope()
    unwrapped = rope_fusion.restore_rope(model) if how == "model" and model is not None else 0
    if how == "mlx":
        rope_fusion.set_kernel_takes_rope(False)
    try:
        yield
    finally:
        rope_fusion.set_kernel_takes_rope(takes)
        if unwrapped:
            rope_fusion.defer_rope(model)


def main() -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from bench.report import markdown_table, write_section
    from services.turboquant import TurboQuantConfig, make_turboquant_cache

    ap = argparse.ArgumentParser()
    # (the model the test suite converts; the graph built a step is the same in any dtype)
    ap.add_argument("--model", default=str(ROOT / ".cache/models/smollm2-135m-instruct"))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--block", type=int, default=20, help="steps a cache runs before the other")
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions of ours")
    ap.add_argument("--write", action="store_true", help="write the docs/benchmarks.md section")
    ap.add_argument("--calls", action="store_true", help="time update and attention calls too")
    ap.add_argument(
        "--cut",
        action="store_true",
        help="a third cache: ours with the tail views cut a step (BUFFERED_TAIL off)",
    )
    ap.add_argument(
        "--mlxrope",
        action="store_true",
        help="a third cache: ours with the decode step's RoPE by MLX ops (rope_fusion off)",
    )
    ap.add_argument("--opcodes", type=int, default=0, help="count opcodes over N steps instead")
    args = ap.parse_args()
    if (args.cut or args.mlxrope) and args.calls:
        ap.error("--calls times ours by class: run it without --cut or --mlxrope")

    model, _ = load(args.model)
    hook_kernels()
    prompt = mx.random.randint(0, 1000, (1, args.context))
    caches = {
        "fp16 KVCache": make_prompt_cache(model),
        "turboquant default": with_join_workspaces(
            make_turboquant_cache(model, TurboQuantConfig.recommended())
        ),
    }
    if args.cut:
        caches["turboquant, tail cut a step"] = with_join_workspaces(
            make_turboquant_cache(model, TurboQuantConfig.recommended())
        )
        for c in caches["turboquant, tail cut a step"]:
            c.BUFFERED_TAIL = False
    if args.mlxrope:
        caches["turboquant, RoPE by MLX ops"] = with_join_workspaces(
            make_turboquant_cache(model, TurboQuantConfig.recommended())
        )
    for cache in caches.values():  # prefill (portable path: one launch per layer is decode)
        mx.eval(model(prompt, cache=cache))
    if args.opcodes:
        hook_kernels(CachedStandInKernel)  # (its launches add no graph node)
        ours = caches["turboquant default"]
        count_opcodes(model, ours, 20)  # (plans and builds first)
        per = count_opcodes(model, ours, args.opcodes)
        print(f"{Path(args.model).name}, context {args.context}, a decode layer: ours "
              f"{per['ours']:.0f} opcodes in {per['ours calls']:.1f} Python calls; the model's "
              f"own code {per['other']:.0f} opcodes")  # fmt: skip
        return
    layers = sum(1 for c in caches["turboquant default"] if hasattr(c, "key_spec"))
    acc: dict = {}
    if args.calls:
        time_calls(acc)
    y = mx.array([[1]])
    times = {k: [] for k in caches}
    prof = cProfile.Profile() if args.profile else None
    # The caches take turns a block of steps at a time, as a decode loop runs one cache:
    # alternating every step, each step's build also paid for the other cache's objects
    # (+12-16 us a layer here against +4-9 in separate processes; session 13).
    # A warm-up block (it builds caches and plans), then args.steps timed steps each.
    blocks = [args.block] + [
        min(args.block, args.steps - s) for s in range(0, args.steps, args.block)
    ]
    for i, steps in enumerate(blocks):
        if i == 1:
            acc.clear()  # the call timings count from the same step as the rest
        for name, cache in caches.items():
            how = "model" if "fp16" in name else "mlx" if "RoPE by MLX" in name else "kernel"
            with rope_mode(model, how):
                for _ in range(steps):
                    if prof and name != "fp16 KVCache":
                        prof.enable()
                    t = time.perf_counter()
                    logits = model(y, cache=cache)
                    dt = time.perf_counter() - t
                    if prof:
                        prof.disable()
                    if i:
                        times[name].append(dt)
                    mx.eval(logits, [x for _, x in tree_flatten([c.state for c in cache])])
    base = statistics.median(times["fp16 KVCache"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append([name, f"{med * 1e3:.2f}", f"{(med - base) / layers * 1e6:+.1f}"])
    body = (
        f"{Path(args.model).name}: {layers} attention layers, context {args.context}, "
        f"{len(times['fp16 KVCache'])} decode steps each, the caches taking turns "
        f"{args.block} steps at a time; only "
        "the graph of each step is built and timed (it is evaluated untimed). The CUDA "
        "kernels are hooked in as on a GPU (each cache layer with its join workspace: one "
        "launch a layer at this context) but launch stand-ins, so MLX's per-launch costs "
        "of a real custom kernel are not included.\n\n"
        + markdown_table(["cache", "ms a step (median)", "us a layer over fp16"], rows)
    )
    if args.mlxrope:
        body += (
            "\nOurs applies the step's RoPE in the layer kernel (rope_fusion) unless the row "
            "says MLX ops. On a CPU `mx.fast.rope` builds its fallback graph (~10 us a call "
            "here); on CUDA it is one primitive (a few us on the H200's host), so the gap "
            "between those two rows overstates the GPU host's saving (bench/gpu_notes.md, "
            "session 18).\n"
        )
    if acc:
        per = 1e6 / (layers * len(times["fp16 KVCache"]))
        calls = [[part] + [f"{acc.get((c, part), 0.0) * per:.1f}" for c in ("fp16", "ours")]
                 for part in ("update", "attention")]  # fmt: skip
        body += (
            "\nPer layer and step, inside the model (mean us; the stand-in launches are in "
            "ours' attention): fp16 = mlx-lm's KVCache update and `mx.fast` SDPA.\n\n"
            + markdown_table(["call", "fp16 us", "ours us"], calls)
        )
    print(body)
    if prof:
        stats = pstats.Stats(prof).sort_stats("tottime")
        stats.print_stats(r"services/turboquant", args.profile)
    elif args.write:
        write_section("host_time", "Host time of a decode step (graph build)", body)


if __name__ == "__main__":
    main()
