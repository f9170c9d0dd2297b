"""Host cost of putting one kernel on the GPU with MLX's CUDA backend, per kind of kernel.

Runs on the GPU machine:

    python bench/dispatch_cost.py [--nodes 64]

For a chain of ``nodes`` calls (each call's output the next one's input, as a model's layers
run) it prints, per call: the graph-build time in Python, the host time inside
``mx.async_eval`` (MLX encodes every node of a CUDA graph there) and the wall time until the
GPU is done. Kinds: a built-in op, a trivial custom kernel with a small and with a 24 KB
header (MLX rebuilds and hashes a custom kernel's whole source on every call), with as many
inputs, template arguments or outputs as our split kernel (what each costs), fp16 SDPA at
4K, our decode layer at 4K (two custom kernels), and a decode step's cache update
(mlx-lm's KVCache vs ours). Run it under ``MLX_USE_CUDA_GRAPHS=0``
or ``MLX_MAX_OPS_PER_BUFFER=N`` to see what the CUDA graphs cost or hide. Back here,

    python bench/dispatch_cost.py --render before=a.json,after=b.json --machine "..."

writes the "dispatch_cost" section of docs/benchmarks.md (one row per run, kind and setting).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRIVIAL = """
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_elem) { out[i] = x[i] + static_cast<T>(1); }
"""


def trivial_kernel(x0, header: str = "", extra_inputs: int = 0, extra_template: int = 0,
                   outputs: int = 1, strides: bool = True):  # fmt: skip
    """``step(x)`` launching a trivial custom kernel (out0 = x + 1); ``extra_*``: unread
    inputs (``x0``, strided, as ours) and template arguments, ``outputs``: outputs (the split
    kernel has 15 inputs, 17 template arguments and 4 outputs); ``strides``: the extra
    inputs' shapes and strides are kernel parameters (120 bytes each, as ours), else
    pointers only."""
    import mlx.core as mx

    from services.turboquant.kernels.jit import source_name

    names = ["x"] + [f"u{i}" for i in range(extra_inputs)]
    use = "    (void)u{i}_shape; (void)u{i}_strides;\n" if strides else ""
    source = (
        "    const unsigned int n_elem = x_shape[0];\n"
        + "".join(use.format(i=i) for i in range(extra_inputs))
        + TRIVIAL.replace("out[i]", "out0[i]")
    )
    k = mx.fast.cuda_kernel(
        name=source_name(f"tq_trivial_{extra_inputs}_{extra_template}_{outputs}", header, source),
        input_names=names,
        output_names=[f"out{i}" for i in range(outputs)],
        source=source,
        header=header,
        ensure_row_contiguous=not extra_inputs,
    )
    template = [("T", mx.float16)] + [(f"P{i}", i) for i in range(extra_template)]
    return lambda x: k(
        inputs=[x] + [x0] * extra_inputs,
        template=template,
        grid=(x.size, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape] * outputs,
        output_dtypes=[x.dtype] * outputs,
    )[0]


def chain_cost(step, x0, nodes: int, repeat: int = 7) -> dict:
    """Median per-call microseconds of build, async_eval and wall time for ``nodes`` calls,
    each ``step`` taking the previous output (the first ``x0``): attention_gpu's chained
    timing, warmed up with a whole chain."""
    from bench.attention_gpu import bench_time

    host: dict = {}
    wall = bench_time([lambda prev=None: step(x0 if prev is None else prev)], reps=nodes,
                      repeat=repeat, chain=True, host=host, warm=nodes)  # fmt: skip
    return {"build_us": host["build"] * 1e6, "dispatch_us": host["dispatch"] * 1e6,
            "wall_us": wall * 1e6}  # fmt: skip


def render(paths: str, machine: str | None, command: str | None, note: str = "") -> None:
    """The dispatch_cost section of docs/benchmarks.md from result files (comma-separated)."""
    from bench.report import markdown_table, write_section

    rows = []
    for entry in paths.split(","):
        label, _, path = entry.rpartition("=")  # "label=path" names the run
        for r in json.loads(Path(path).read_text()):
            env = ", ".join(f"{k}={v}" for k, v in r["env"].items()) or "MLX defaults"
            rows.append([label or "-", r["kind"], env, f"{r['build_us']:.1f}",
                         f"{r['dispatch_us']:.1f}", f"{r['wall_us']:.1f}"])  # fmt: skip
    head = ["run", "kind (chain of calls)", "setting", "build us", "async_eval us", "wall us"]
    body = (
        "Per call, median of 7 chains of 64 calls (each call's output the next one's input). "
        "build: Python and graph construction; async_eval: MLX encoding the kernels (CUDA "
        "graph nodes, or launches with graphs off); wall: from async_eval to the GPU done.\n\n"
        + (note + "\n\n" if note else "")
        + markdown_table(head, rows)
    )
    write_section("dispatch_cost", "Host cost of a kernel call (MLX CUDA)", body,
                  machine=machine, command=command)  # fmt: skip


def main() -> None:
    from bench.report import add_section_args

    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    add_section_args(ap, "result JSONs (comma-separated) to write into the docs")
    args = ap.parse_args()
    if args.render:
        render(args.render, args.machine, args.command, args.note)
        return

    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from bench.attention_gpu import cache_sides, kv_cache_slices
    from services.turboquant import TurboQuantConfig, TurboQuantKVCache
    from services.turboquant.attention import turboquant_attention
    from services.turboquant.kernels import mma_decode

    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    small = mx.random.normal((4096,)).astype(mx.float16)
    mx.eval(small)

    pad = "// padding: a header the size of the split kernel's\n" * 460
    n, d, hq, hkv = args.context, 128, 32, 8
    k, v = kv_cache_slices(hkv, n, d)
    q = mx.random.normal((1, hq, 1, d)).astype(mx.float16)
    ks, vs = cache_sides(k, v, TurboQuantConfig.recommended())
    mx.eval(k, v, q, ks, vs)
    # A decode step's cache update (one position appended; ours quantizes a block every
    # 128 steps, as in decode), each output feeding the next.
    kv_cache, tq_cache = KVCache(), TurboQuantKVCache(TurboQuantConfig.recommended())
    kv_cache.update_and_fetch(k, v)
    tq_cache.update_and_fetch(k, v)
    k1 = mx.random.normal((1, hkv, 1, d)).astype(mx.float16)
    mx.eval(k1, kv_cache.state, tq_cache.state)
    scale = 1.0 / math.sqrt(d)

    def split_only(x):
        o_part = mma_decode._split(x, ks.rotation, ks, vs, scale, None, False)[0]
        return o_part[:, :, :1, :].astype(x.dtype)  # (B, Hq, 1, D) again

    kinds = {
        "built-in add": (lambda x: x + 1, small),
        "custom kernel, small header": (trivial_kernel(small), small),
        f"custom kernel, {len(pad) // 1024} KB header": (trivial_kernel(small, pad), small),
        "custom kernel, 15 inputs": (trivial_kernel(small, "", 14), small),
        "custom kernel, 15 inputs, pointers only": (trivial_kernel(small, "", 14, strides=False), small),
        "custom kernel, 17 template arguments": (trivial_kernel(small, extra_template=16), small),
        "custom kernel, 4 outputs": (trivial_kernel(small, outputs=4), small),
        f"fp16 SDPA {n}": (
            lambda x: mx.fast.scaled_dot_product_attention(x, k, v, scale=scale), q),
        f"ours default layout {n}": (lambda x: turboquant_attention(x, ks, vs, scale), q),
        # the layer's first launch alone (its o_part fed back as the query: same shapes)
        f"ours split launch {n}": (lambda x: split_only(x), q),
        f"fp16 KVCache update {n}": (lambda x: kv_cache.update_and_fetch(x, x)[0][:, :, -1:], k1),
        f"ours cache update {n}": (lambda x: tq_cache.update_and_fetch(x, x)[0].tail[:, :, -1:], k1),
    }  # fmt: skip
    rows = []
    for name, (step, x0) in kinds.items():
        r = chain_cost(step, x0, args.nodes)
        r.update(kind=name, env=env)
        rows.append(r)
        print(f"{name:34s} build {r['build_us']:7.1f} us  async_eval {r['dispatch_us']:7.1f} us"
              f"  wall {r['wall_us']:7.1f} us   {env}", flush=True)  # fmt: skip
    # Last (it swaps mx.fast.cuda_kernel for good): the same layer with launches that add no
    # graph node, i.e. our Python alone; the layer minus this = MLX's work for the two calls.
    from bench.host_time import CachedStandInKernel, hook_kernels

    hook_kernels(CachedStandInKernel)
    name = f"ours default layout {n}, no launches"
    r = chain_cost(lambda x: turboquant_attention(x, ks, vs, scale), q, args.nodes)
    r.update(kind=name, env=env)
    rows.append(r)
    print(f"{name:34s} build {r['build_us']:7.1f} us  async_eval {r['dispatch_us']:7.1f} us",
          flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "_".join(f"{k}-{v}" for k, v in sorted(env.items())) or "default"
    (out / f"dispatch_cost_{tag}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
