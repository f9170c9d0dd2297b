"""Decode attention per layer on a CUDA GPU: fp16 SDPA vs mlx-lm affine vs our fused kernel.

Runs on the GPU machine (imports only mlx, mlx_lm, numpy and our kernel package):

    python bench/attention_gpu.py --out $OUT        # correctness grid, then timings

prints a short table last and writes ``attention_gpu.json``. Back here,

    python bench/attention_gpu.py --render attention_gpu.json --machine "..." --command "..."

writes the "attention_gpu" section of docs/benchmarks.md. Timing: a graph of ``reps``
calls (rotating over input sets larger than the L2) is evaluated at once and the wall time
of ``mx.eval`` + synchronize is divided by ``reps``; median of 5. Whole layers are
chained -- each call's output is the next call's query, so they run one after another as
a model's layers do (latency); the kernel-only sweep is of independent calls, which the
GPU may overlap (throughput).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import tune_arg  # noqa: E402

L2_BYTES = 60 * 2**20


def input_sets(fp16_bytes: int, most: int = 64, budget: float = 8e9) -> int:
    """Input sets a bench rotates over so that no call can find its keys and values in the
    L2, as in a model (a step streams its weights between two uses of a layer's KV): even
    the smallest format's copy of them all (3-bit codes, ~1/5 of fp16's bytes) is 4x the
    L2. Until session 23 the benches took 2 sets from 32K up -- ours' 2 x 34 MB at 32K
    against a 50 MB L2 (bench/gpu_notes.md, session 23)."""
    want = math.ceil(4 * L2_BYTES / (fp16_bytes / 5))
    return int(max(2, min(want, most, budget // fp16_bytes)))


def load_kernels():
    """Our kernel package; standalone by path if the rest of services/ cannot import here."""
    try:
        from services.turboquant import kernels

        return kernels
    except Exception as exc:  # noqa: BLE001 - any import failure elsewhere in the package
        print(f"note: services.turboquant import failed ({exc!r}); loading kernels by path")
        path = ROOT / "services" / "turboquant" / "kernels"
        spec = importlib.util.spec_from_file_location(
            "tq_kernels", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["tq_kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


# ----------------------------------------------------------------------------- correctness
CHECK_SHAPES = [  # (batch, q heads, kv heads, head dim)
    (1, 32, 8, 128),
    (2, 16, 2, 256),
    (1, 8, 8, 64),
    (1, 28, 4, 128),  # GQA 7: a head block of 7
    (1, 64, 4, 128),  # GQA 16: two head blocks of 8
    (1, 4, 1, 32),
]
CHECK_FORMATS = [  # (quantizer, key bits, value bits, group size)
    ("affine", 4, 4, 64),
    ("affine", 8, 8, 64),
    ("affine", 3, 3, 64),
    ("affine", 2, 2, 32),
    ("affine", 8, 4, 128),
    ("affine", 4, 3, 32),
    ("codebook", 4, 4, 0),
    ("codebook", 3, 3, 0),
    ("codebook", 2, 2, 0),
    ("codebook", 4, 3, 0),
]
CHECK_LENGTHS = [77, 4099]  # every shape and format
CHECK_LENGTHS_MAIN = [1, 129, 1000, 33333]  # also, for the first shape
TOL = 2e-5  # fp32 arithmetic on exactly the stored values


def run_checks(km, rng, quick: bool = False) -> list[dict]:
    """Kernel vs float64 reference on fresh random inputs; every output poisoned first."""
    import mlx.core as mx

    from_cases = importlib.import_module(km.__name__ + ".cases")
    ref_mod = importlib.import_module(km.__name__ + ".reference")
    fd = importlib.import_module(km.__name__ + ".fused_decode")
    rows = []
    t_start = time.perf_counter()
    # quick: two shapes and four formats (~1 min instead of ~5, mostly kernel compiles).
    shapes = CHECK_SHAPES[:2] if quick else CHECK_SHAPES
    formats = [CHECK_FORMATS[i] for i in (0, 2, 6, 7)] if quick else CHECK_FORMATS
    for bsz, hq, hkv, d in shapes:
        print(f"checks {bsz}x{hq}/{hkv}x{d} at {time.perf_counter() - t_start:.0f}s", flush=True)
        for qz, kb, vb, gs in formats:
            gs = min(gs or 64, d)
            lengths = CHECK_LENGTHS + (
                CHECK_LENGTHS_MAIN if (bsz, hq, hkv, d) == CHECK_SHAPES[0] else []
            )
            for n in lengths:
                case = from_cases.make_case(
                    rng,
                    batch=bsz,
                    q_heads=hq,
                    kv_heads=hkv,
                    dim=d,
                    length=n,
                    quantizer=qz,
                    key_bits=kb,
                    value_bits=vb,
                    group_size=gs,
                    capacity_extra=int(rng.integers(0, 300)),
                    sinks=bool(n % 2),
                )
                errs = []
                launches = [{}, {"splits": 7}] + ([{"tpb": 128, "tile": 128}] if n == 77 else [])
                for kw in launches:
                    out = fd.fused_decode_attention(
                        case.q_rot,
                        case.keys,
                        case.values,
                        case.scale,
                        poison=True,
                        **case.kwargs(),
                        **kw,
                    )
                    mx.eval(out)
                    errs.append(ref_mod.rel_error(np.array(out), case.reference()))
                err = max(errs) if not any(math.isnan(e) for e in errs) else float("nan")
                ok = err <= TOL
                rows.append(
                    dict(
                        shape=f"{bsz}x{hq}/{hkv}x{d}",
                        fmt=f"{qz} k{kb}v{vb} g{gs}",
                        length=n,
                        rel_err=err,
                        ok=bool(ok),
                    )
                )
                if not ok:
                    print("FAIL", rows[-1], errs, flush=True)
    return rows


# The v4 (tensor-core) kernel is checked through real caches: TurboQuantConfig fields.
MMA_LAYOUTS = {
    "default k4v4 chan g128 s1": dict(key_quantizer="channel", group_size=128, sink_tokens=1),
    "chan k4v4 g64 s1 w64": dict(key_quantizer="channel", sink_tokens=1, window=64),
    "chan k8v8 g128": dict(key_quantizer="channel", key_bits=8, value_bits=8, group_size=128),
    "chan k3v3 g128 s1": dict(key_quantizer="channel", key_bits=3, value_bits=3, group_size=128,
                              sink_tokens=1),
    "chan k2v4 g128 cbV": dict(key_quantizer="channel", value_quantizer="codebook", key_bits=2,
                               group_size=128),
    "plain affine k4v4 g64": dict(),
    "affine k3v3 g64 s2": dict(key_bits=3, value_bits=3, sink_tokens=2),
    "affine k8v4 g128": dict(key_bits=8, group_size=128),
    "affine k2v2 g32": dict(key_bits=2, value_bits=2, group_size=32),
    "codebook k4v4": dict(quantizer="codebook"),
    "codebook k3v3 s1": dict(quantizer="codebook", key_bits=3, value_bits=3, sink_tokens=1),
    "codebook k2v3": dict(quantizer="codebook", key_bits=2, value_bits=3),
}  # fmt: skip
MMA_SHAPES = [(1, 32, 8, 128), (2, 16, 2, 256), (1, 8, 8, 64), (1, 28, 4, 128), (1, 64, 4, 128),
              (1, 12, 1, 64)]  # fmt: skip
MMA_TOL = 5e-3  # float16 operands on the tensor cores (METHOD: fp16 ~1e-3)


def run_mma_checks(
    rng, quick: bool = False, select: str = "", save=None, only: str = "", longer: str = ""
) -> list[dict]:
    """v4 through real caches (decode step, kernel joined with sink/tail) vs float64.

    ``select``: comma-separated run indices (0-5: the shapes under the dispatch's rules,
    6-7: the forced variants on shape 0, 8: the portable path, 9: shape 0 with the v5
    loads instead of the staged tiles, 10: the default layout read through misaligned
    views, 11: decode steps whose new positions the kernel writes, 12: the same with their
    RoPE applied by the kernel), all by default;
    ``save(rows)`` after each run (a call cut by its time limit keeps what it checked).
    ``only``: comma-separated layout names to check (all by default); ``longer``:
    comma-separated lengths checked on the first shape besides its own (error growth).
    """
    import mlx.core as mx

    from services.turboquant import TurboQuantConfig
    from services.turboquant.attention import join_body, rotate
    from services.turboquant.kernels import mma_decode
    from services.turboquant.kernels.cases import cache_case
    from services.turboquant.kernels.reference import rel_error

    rows = []
    t0 = time.perf_counter()
    layouts = [(k, v) for k, v in MMA_LAYOUTS.items() if not only or k in only.split(",")]
    # The dispatch's rule on every shape; each forced super-tile size on the first shape.
    runs = [(shape, None, True) for shape in (MMA_SHAPES[:3] if quick else MMA_SHAPES)]
    runs += [(MMA_SHAPES[0], 4, True), (MMA_SHAPES[0], 8, True)]
    forced = [(MMA_SHAPES[0], None, False)]  # run 9: PIPELINE off
    if select:
        every = [(shape, None, True) for shape in MMA_SHAPES] + runs[-2:] + [None] + forced
        runs = [every[int(i)] for i in select.split(",") if int(i) < len(every) and every[int(i)]]
    default_steps, default_pipe = mma_decode.STEPS, mma_decode.PIPELINE  # (--tune's)
    for shape, steps, pipeline in runs:
        mma_decode.STEPS, mma_decode.PIPELINE = steps, default_pipe if pipeline else False
        bsz, hq, hkv, d = shape
        print(f"mma checks {shape} steps {steps} pipeline {pipeline} at "
              f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
        for name, cfg in layouts:
            lengths = [77, 1000, 4099] + ([129, 33333] if shape == MMA_SHAPES[0] else [])
            if shape == MMA_SHAPES[0]:
                lengths += [int(x) for x in longer.split(",") if x]
            for n in lengths:
                c = cache_case(rng, TurboQuantConfig(**cfg), batch=bsz, q_heads=hq,
                               kv_heads=hkv, dim=d, length=n, sinks=bool(n % 2))  # fmt: skip
                if c.keys.n_body == 0:
                    continue  # all in the full-precision segments: the portable path's job
                ok_shape = mma_decode.supports(c.queries, c.keys, c.values)
                if not ok_shape:
                    rows.append(dict(shape=str(shape), fmt=name, length=n, rel_err=float("nan"),
                                     ok=False, note="declined"))  # fmt: skip
                    print("DECLINED", name, shape, n, flush=True)
                    continue
                ref = c.reference()
                q_rot = rotate(c.queries, c.keys.rotation)
                errs = []
                # The fused join (default, forced splits: some empty), and the MLX join.
                for splits in (None, 7, 1):
                    out = mma_decode.mma_decode_layer(
                        c.queries, c.keys, c.values, c.scale, c.sinks, splits=splits,
                        poison=True,
                    )  # fmt: skip
                    mx.eval(out)
                    errs.append(rel_error(np.array(out.astype(mx.float32)), ref))
                body = mma_decode.mma_body_attention(q_rot, c.keys, c.values, c.scale, poison=True)
                out = join_body(c.queries, q_rot, body, c.keys, c.values, c.scale, c.sinks)
                errs.append(rel_error(np.array(out), ref))
                err = max(errs) if not any(math.isnan(e) for e in errs) else float("nan")
                tag = f"{name} steps{steps or 'auto'}" + ("" if pipeline else " v5-loads")
                rows.append(dict(shape=str(shape), fmt=tag, length=n, rel_err=err,
                                 ok=bool(err <= MMA_TOL)))  # fmt: skip
                if not rows[-1]["ok"]:
                    print("FAIL", rows[-1], errs, flush=True)
        if save is not None:
            save(rows)
    mma_decode.STEPS, mma_decode.PIPELINE = default_steps, default_pipe
    if not select or "8" in select.split(","):
        rows += run_portable_checks(rng)
        if save is not None:
            save(rows)
    if not select or "10" in select.split(","):
        rows += run_misaligned_checks(rng)
        if save is not None:
            save(rows)
    if not select or "11" in select.split(","):
        rows += run_append_checks(rng)
        if save is not None:
            save(rows)
    if not select or "12" in select.split(","):
        rows += run_append_checks(rng, rope=True)
        if save is not None:
            save(rows)
    return rows


def _check_ropes(shape):
    """RoPEs the rope checks (run 12) apply on ``shape``'s head dim: Llama 3.1's (base 5e5,
    its frequency bands), Qwen3.5's partial one (64 of 256 dims, base 1e7), a traditional."""
    import mlx.nn as nn
    from mlx_lm.models.rope_utils import Llama3RoPE

    from services.turboquant.rope_fusion import DeferringRope, rope_spec

    d = shape[3]
    if d == 256:
        rope = nn.RoPE(64, traditional=False, base=1e7)
    elif shape == MMA_SHAPES[0]:
        rope = Llama3RoPE(d, 131072, False, 500000.0, dict(factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192))  # fmt: skip
    else:
        rope = nn.RoPE(d, traditional=True, base=10000.0)
    return DeferringRope(rope, rope_spec(rope))


def run_append_checks(rng, rope: bool = False, shapes=None, layouts=None) -> list[dict]:
    """Decode steps whose new position the layer kernel reads from its inputs and writes
    into the tail buffer (cache.TailAppend): each step's output vs float64 over the stored
    positions and the new one, then the tail the state returns vs the positions given.
    ``rope`` (run 12): the query and the new key come unrotated by RoPE (rope_fusion) and
    the kernel applies it; the reference takes MLX's rope of them (float16, as a cache
    without rope_fusion stores them), the tail must hold that within float16 rounding.
    ``shapes`` / ``layouts``: a subset of the runs (tests/turboquant/test_kernels.py)."""
    import mlx.core as mx

    from services.turboquant import TurboQuantConfig
    from services.turboquant.kernels import mma_decode
    from services.turboquant.kernels.cases import CacheCase, cache_case
    from services.turboquant.kernels.reference import rel_error
    from services.turboquant.rope_fusion import PendingRope, as_array

    rows = []
    # Channel keys: their tail holds up to a block of 128 or 64 positions (per-vector keys
    # leave the tail at once, no step defers); lengths whose tail takes 4 steps uncompressed.
    layouts = layouts or ["default k4v4 chan g128 s1", "chan k4v4 g64 s1 w64", "chan k8v8 g128"]
    for shape in shapes or (MMA_SHAPES[0], MMA_SHAPES[1], MMA_SHAPES[4]):
        bsz, hq, hkv, d = shape
        wrap = _check_ropes(shape) if rope else None
        for name in layouts:
            runs = [(1000, True), (4000, True), (4000, False)]
            if rope and name == layouts[0]:  # angles past sincosf's fast range (~1e5)
                runs.append((131000 if shape == MMA_SHAPES[0] else 40000, True))
            for n, fused in runs:
                saved = mma_decode.FUSED_JOIN
                mma_decode.FUSED_JOIN = fused
                try:
                    c = cache_case(rng, TurboQuantConfig(**MMA_LAYOUTS[name]), batch=bsz,
                                   q_heads=hq, kv_heads=hkv, dim=d, length=n, sinks=True,
                                   steps=3)  # fmt: skip
                    errs, given = [], []
                    for step in range(4):  # the case's last step, then three more
                        if step:
                            k = mx.array(rng.standard_normal((bsz, hkv, 1, d)).astype(np.float16))
                            v = mx.array(rng.standard_normal((bsz, hkv, 1, d)).astype(np.float16))
                            ks, vs = c.cache.update_and_fetch(k, v)
                            c = CacheCase(c.queries, ks, vs, c.scale, c.sinks, c.cache)
                        assert c.keys.append is not None, "the step did not defer its write"
                        if wrap is not None:  # the step's query and key, pending their RoPE
                            last = int(c.cache.offset) - 1
                            q = c.queries.x if isinstance(c.queries, PendingRope) else c.queries
                            c.keys.append.k = PendingRope(c.keys.append.k, wrap, last)
                            c = CacheCase(PendingRope(q, wrap, last), c.keys, c.values, c.scale,
                                          c.sinks, c.cache)  # fmt: skip
                            taken = mma_decode._rope_taken(c.queries, c.keys, c.keys.append, last)
                            assert taken is not None, "the kernel would not take the RoPE"
                        given.append((np.array(as_array(c.keys.append.k)),
                                      np.array(c.keys.append.v)))  # fmt: skip
                        ref = c.reference()
                        out = mma_decode.mma_decode_layer(c.queries, c.keys, c.values, c.scale,
                                                          c.sinks, poison=True)  # fmt: skip
                        mx.eval(out)
                        errs.append(rel_error(np.array(out.astype(mx.float32)), ref))
                    state = c.cache.state  # settles: the last writer queued before these
                    tk, tv = np.array(state[2]), np.array(state[3])
                    # RoPE: the kernel's float32 angles vs MLX's, each within ~an ulp of the
                    # angle (pos * 2^-23 radians: its inverse frequencies are float32 made
                    # another way), then float16: a wrong position or no write is off by O(1)
                    tol = 4e-3 + 2.0**-21 * n * float(np.abs(np.array(given[0][0])).max())
                    same = (lambda a, b, tol=tol: np.allclose(a, b, rtol=4e-3, atol=tol)) if rope else (
                        np.array_equal)  # fmt: skip
                    stored = all(
                        same(tk[:, :, i - 4], gk[:, :, 0]) and np.array_equal(tv[:, :, i - 4], gv[:, :, 0])
                        for i, (gk, gv) in enumerate(given)
                    )  # fmt: skip
                finally:
                    mma_decode.FUSED_JOIN = saved
                err = max(errs) if not any(math.isnan(e) for e in errs) else float("nan")
                fmt = f"{name} append{' rope' if rope else ''}{'' if fused else ' 2 launches'}"
                rows.append(dict(shape=str(shape), fmt=fmt, length=n, rel_err=err,
                                 ok=bool(err <= MMA_TOL and stored)))  # fmt: skip
                print("append", rows[-1], "tail written" if stored else "TAIL NOT WRITTEN",
                      flush=True)  # fmt: skip
    return rows


def _misaligned(part):
    """``part`` as a view one 32-bit word into a wider array: rows of an odd number of
    words and a base 4 bytes past 16-byte alignment (the staged tiles' 4-byte copies)."""
    import mlx.core as mx

    pad = mx.zeros((*part.shape[:-1], 1), dtype=part.dtype)
    return mx.concatenate([pad, part], axis=-1)[..., 1:]


def run_misaligned_checks(rng) -> list[dict]:
    """The default layout's codes read through misaligned views, vs float64."""
    import dataclasses

    import mlx.core as mx

    from services.turboquant import TurboQuantConfig
    from services.turboquant.kernels import mma_decode
    from services.turboquant.kernels.cases import cache_case
    from services.turboquant.kernels.reference import rel_error

    rows = []
    bsz, hq, hkv, d = MMA_SHAPES[0]
    for n in (1000, 4099):
        c = cache_case(rng, TurboQuantConfig.recommended(), batch=bsz, q_heads=hq, kv_heads=hkv,
                       dim=d, length=n, sinks=True)  # fmt: skip
        keys = dataclasses.replace(c.keys, parts=(_misaligned(c.keys.parts[0]), *c.keys.parts[1:]))
        values = dataclasses.replace(
            c.values, parts=(_misaligned(c.values.parts[0]), *c.values.parts[1:])
        )
        out = mma_decode.mma_decode_layer(c.queries, keys, values, c.scale, c.sinks, poison=True)
        mx.eval(out)
        err = rel_error(np.array(out.astype(mx.float32)), c.reference())
        rows.append(dict(shape=str(MMA_SHAPES[0]), fmt="default misaligned views", length=n,
                         rel_err=err, ok=bool(err <= MMA_TOL)))  # fmt: skip
        print("misaligned", rows[-1], flush=True)
    return rows


PORTABLE_LAYOUTS = ["default k4v4 chan g128 s1", "plain affine k4v4 g64", "codebook k4v4"]


def run_portable_checks(rng, prefix: int = 3000, chunk: int = 256) -> list[dict]:
    """The portable path on this device, kernels unhooked (on CUDA it is the fallback and
    all of prefill): a decode step, and a prefill chunk over a compressed prefix with a
    causal mask, through real caches, vs float64 over what the caches store."""
    import mlx.core as mx

    from services.turboquant import TurboQuantConfig, TurboQuantKVCache
    from services.turboquant.attention import (
        set_body_decode_kernel,
        set_layer_decode_kernel,
        turboquant_attention,
    )
    from services.turboquant.kernels.cases import cache_case, decoded
    from services.turboquant.kernels.reference import decode_attention, rel_error

    hq, hkv, d = 32, 8, 128
    rows = []
    old = set_layer_decode_kernel(None), set_body_decode_kernel(None)
    try:
        for name in PORTABLE_LAYOUTS:
            cfg = TurboQuantConfig(**MMA_LAYOUTS[name])
            c = cache_case(rng, cfg, batch=1, q_heads=hq, kv_heads=hkv, dim=d, length=4099,
                           sinks=True)  # fmt: skip
            out = turboquant_attention(c.queries, c.keys, c.values, c.scale, sinks=c.sinks)
            err = rel_error(np.array(out.astype(mx.float32)), c.reference())
            rows.append(dict(shape=str((1, hq, hkv, d)), fmt=f"portable decode {name}",
                             length=4099, rel_err=err, ok=bool(err <= MMA_TOL)))  # fmt: skip

            cache = TurboQuantKVCache(cfg)
            n = prefix + chunk
            k = mx.array(rng.standard_normal((1, hkv, n, d)).astype(np.float16))
            v = mx.array(rng.standard_normal((1, hkv, n, d)).astype(np.float16))
            q = mx.array(rng.standard_normal((1, hq, chunk, d)).astype(np.float16))
            cache.update_and_fetch(k[:, :, :prefix], v[:, :, :prefix])
            ks, vs = cache.update_and_fetch(k[:, :, prefix:], v[:, :, prefix:])
            out = turboquant_attention(q, ks, vs, c.scale, mask="causal")
            q64 = np.array(q.astype(mx.float32))
            ref = decode_attention(q64, np.array(decoded(ks)), np.array(decoded(vs)), c.scale,
                                   causal=True)  # fmt: skip
            err = rel_error(np.array(out.astype(mx.float32)), ref)
            rows.append(dict(shape=str((1, hq, hkv, d)), fmt=f"portable prefill {name}",
                             length=n, rel_err=err, ok=bool(err <= MMA_TOL)))  # fmt: skip
            print(rows[-2], rows[-1], flush=True)
    finally:
        set_layer_decode_kernel(old[0])
        set_body_decode_kernel(old[1])
    return rows


# ----------------------------------------------------------------------------- timing
def bench_time(fns, reps: int = 40, repeat: int = 5, chain: bool = False,
               host: dict | None = None, warm: int | None = None) -> float:  # fmt: skip
    """Seconds per call: build ``reps`` calls over rotating input sets, eval them at once.
    ``chain``: each ``fn(q)`` takes the previous call's output as its query (in order, as
    a model's layers run), else the calls are independent. ``host`` gets ``dispatch``:
    seconds per call the host spends in ``async_eval`` (MLX encodes every kernel there;
    the GPU starts a graph only once it is committed), and ``build``: in the Python calls
    that build the graph. ``warm``: calls evaluated first (default: one per input set, at
    least 4)."""
    import mlx.core as mx

    def calls(count):
        if not chain:
            return [fns[i % n]() for i in range(count)]
        q = None
        for i in range(count):
            q = fns[i % n](q)
        return [q]

    n = len(fns)
    mx.eval(calls(warm or max(n, 4)))
    mx.synchronize()
    times, dispatch, build = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        outs = calls(reps)
        build.append((time.perf_counter() - t) / reps)
        mx.synchronize()
        t = time.perf_counter()
        mx.async_eval(outs)
        dispatch.append((time.perf_counter() - t) / reps)
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t) / reps)
    if host is not None:
        host["dispatch"] = statistics.median(dispatch)
        host["build"] = statistics.median(build)
    return statistics.median(times)


def pipelined_time(fns, layers: int = 32, steps: int = 12, repeat: int = 3) -> float:
    """Seconds per layer call in a decode loop: each step a chain of ``layers`` calls (each
    call's output the next one's query), built and ``async_eval``-ed while the GPU still runs
    the previous step, as ``mlx_lm.generate`` pipelines decode. The steady state is the
    larger of the host's share (graph build and encoding) and the GPU's; ``bench_time``'s
    chained mode instead starts the GPU only after the host has encoded most of one chain."""
    import mlx.core as mx

    n = len(fns)

    def step(q):
        for i in range(layers):
            q = fns[i % n](q)
        return q

    mx.eval(step(step(None)))  # warm-up: kernels compiled, graphs cached
    mx.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = step(None)
        mx.async_eval(out)
        for _ in range(steps):
            nxt = step(out)  # built on the previous step's lazy output, as decode does
            mx.async_eval(nxt)
            mx.eval(out)
            out = nxt
        mx.eval(out)
        times.append((time.perf_counter() - t) / ((steps + 1) * layers))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a large device copy (read + write counted)."""
    import mlx.core as mx

    x = mx.random.normal((256 * 2**20,)).astype(mx.float16)
    mx.eval(x)
    t = bench_time([lambda: x + 1], reps=20)
    return 2 * x.nbytes / t


def kv_bytes(variant: str, hkv: int, n: int, d: int) -> int:
    """Bytes of K and V one decode step must read."""
    if variant == "fp16":
        per = d * 2
    elif variant.startswith("ours default layout"):  # 4-bit codes, fp16 scale+bias per 128
        per = d // 2 + 4 * d // 128
    elif variant.startswith(("mlx-lm affine", "ours affine", "v3 affine")):
        bits = int(variant.split()[-1].rstrip("b"))
        per = d * bits // 8 + 2 * (d // 64) * 2
    else:
        bits = int(variant.split()[-1].rstrip("b"))
        per = d * bits // 8 + 2
    return 2 * hkv * n * per


def cache_sides(k, v, config, group_major: bool | None = None):
    """A cache built from ``config`` holding ``k``/``v``: its packed key and value sides,
    as attention receives them; ``group_major``: how per-channel key scales are stored
    (None: the cache's choice, group-major on CUDA)."""
    from services.turboquant import TurboQuantKVCache, install_patch

    install_patch()
    cache = TurboQuantKVCache(config)
    cache.KEY_SCALES_GROUP_MAJOR = group_major
    return cache.update_and_fetch(k, v)


def kv_cache_slices(hkv: int, n: int, d: int):
    """fp16 keys and values as mlx-lm's KVCache hands them to SDPA: the first ``n`` rows
    of a buffer grown in steps of 256. MLX's CUDA SDPA takes cuDNN only for such views (or
    contiguous lengths that are multiples of 256); other lengths get a vector kernel up to
    6x slower at 128K (session 6), which would flatter us."""
    import mlx.core as mx

    rows = -(-n // 256) * 256
    k = mx.random.normal((1, hkv, rows, d)).astype(mx.float16)
    v = mx.random.normal((1, hkv, rows, d)).astype(mx.float16)
    return k[:, :, :n, :], v[:, :, :n, :]


def run_timings(km, contexts, shapes, only: str = "") -> list[dict]:
    """Per-layer and kernel-only times; ``only``: comma-separated variant names (all)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.base import quantized_scaled_dot_product_attention as mlx_qsdpa

    from services.turboquant import TurboQuantConfig
    from services.turboquant.attention import turboquant_attention
    from services.turboquant.kernels import mma_decode

    fd = importlib.import_module(km.__name__ + ".fused_decode")
    rows = []
    for hq, hkv, d in shapes:
        for n in contexts:
            set_bytes = 2 * hkv * n * d * 2
            nsets = input_sets(set_bytes)
            if set_bytes * nsets * 2.2 > 100e9 or (d == 256 and n > 131072):
                continue
            scale = 1.0 / math.sqrt(d)
            sets = []
            for _ in range(nsets):
                k, v = kv_cache_slices(hkv, n, d)
                q = mx.random.normal((1, hq, 1, d)).astype(mx.float16)
                s = dict(
                    q=q,
                    k=k,
                    v=v,
                    k4=mx.quantize(k, group_size=64, bits=4),
                    v4=mx.quantize(v, group_size=64, bits=4),
                    k8=mx.quantize(k, group_size=64, bits=8),
                    v8=mx.quantize(v, group_size=64, bits=8),
                )
                s["tq"] = cache_sides(k, v, TurboQuantConfig.recommended())
                if not only or "D-major" in only:
                    s["tq_dmaj"] = cache_sides(k, v, TurboQuantConfig.recommended(), False)
                s["tq_plain"] = cache_sides(k, v, TurboQuantConfig())
                s["tq_cb4"] = cache_sides(k, v, TurboQuantConfig(quantizer="codebook"))
                s["tq_cb3"] = cache_sides(
                    k, v, TurboQuantConfig(quantizer="codebook", key_bits=3, value_bits=3)
                )
                mx.eval([x for _, x in tree_flatten(s)])
                sets.append(s)

            def layer(s, key, scale=scale):  # the cache's attention as a model layer calls it
                ks, vs = s[key]
                return lambda prev=None: turboquant_attention(
                    s["q"] if prev is None else prev, ks, vs, scale
                )

            def tuned(fn, tune):
                """``fn`` run with mma_decode's ``tune`` settings (STEPS / WARPS /
                SPLIT_FACTOR / FOLD / PIPELINE / LINEAR_GRID), restored after."""

                def f(*args):
                    old = {k: getattr(mma_decode, k) for k in tune}
                    for k, v in tune.items():
                        setattr(mma_decode, k, v)
                    try:
                        return fn(*args)
                    finally:
                        for k, v in old.items():
                            setattr(mma_decode, k, v)

                return f

            def layer_tuned(s, key, **tune):  # layer() under other settings
                return tuned(layer(s, key), tune)

            def v4_only(s, key, scale=scale, **tune):
                """The split kernel alone (it rotates the query), under ``tune``."""
                ks, vs = s[key]
                return tuned(
                    lambda: mma_decode._split(s["q"], ks.rotation, ks, vs, scale, None, False)[0],
                    tune,
                )

            def kernel_only(s, scale=scale, **kw):
                q_rot = s["q"].astype(mx.float32)
                mx.eval(q_rot)
                return lambda: fd.fused_decode_attention(q_rot, s["k4"], s["v4"], scale, **kw)

            variants = {
                "fp16": [
                    lambda prev=None, s=s, scale=scale: mx.fast.scaled_dot_product_attention(
                        s["q"] if prev is None else prev, s["k"], s["v"], scale=scale
                    )
                    for s in sets
                ],
                "mlx-lm affine 8b": [
                    lambda prev=None, s=s, scale=scale: mlx_qsdpa(
                        s["q"] if prev is None else prev, s["k8"], s["v8"], scale, None, 64, 8
                    )
                    for s in sets
                ],
                "mlx-lm affine 4b": [
                    lambda prev=None, s=s, scale=scale: mlx_qsdpa(
                        s["q"] if prev is None else prev, s["k4"], s["v4"], scale, None, 64, 4
                    )
                    for s in sets
                ],
                "v3 affine 4b (kernel only)": [kernel_only(s) for s in sets],
                "ours default layout": [layer(s, "tq") for s in sets],
                "ours default layout (kernel only)": [v4_only(s, "tq") for s in sets],
                "ours default layout (rows grid)": [
                    layer_tuned(s, "tq", LINEAR_GRID=False) for s in sets
                ],
                "ours default layout (D-major scales)": [
                    layer(s, "tq_dmaj") for s in sets if "tq_dmaj" in s
                ],
                # one launch a layer: the split kernel's last blocks join (FUSED_JOIN)
                "ours default layout (fused join)": [
                    layer_tuned(s, "tq", FUSED_JOIN=True, FUSED_MAX_WORK=None) for s in sets
                ],
                "ours default layout (two launches)": [
                    layer_tuned(s, "tq", FUSED_JOIN=False) for s in sets
                ],
                # the same layers as a decode loop runs them (pipelined_time)
                "fp16 (pipelined)": "fp16",
                "ours default layout (pipelined)": "ours default layout",
                "ours default layout (fused join) (pipelined)": "ours default layout (fused join)",
                "ours default layout (two launches) (pipelined)": "ours default layout (two launches)",
                "kernel default v5 loads": [v4_only(s, "tq", PIPELINE=False) for s in sets],
                "kernel default splits3": [v4_only(s, "tq", SPLIT_FACTOR=3) for s in sets],
                "kernel default splits4": [v4_only(s, "tq", SPLIT_FACTOR=4) for s in sets],
                "ours affine 4b": [layer(s, "tq_plain") for s in sets],
                "ours affine 4b (kernel only)": [v4_only(s, "tq_plain") for s in sets],
                "ours codebook 4b": [layer(s, "tq_cb4") for s in sets],
                "ours codebook 3b": [layer(s, "tq_cb3") for s in sets],
            }
            for name, fns in variants.items():
                if only and name not in only.split(","):
                    continue
                host: dict = {"dispatch": float("nan")}
                if isinstance(fns, str):  # a pipelined variant: the named variant's calls
                    t = pipelined_time(variants[fns])
                else:
                    chain = name in LAYER_VARIANTS and "kernel only" not in name
                    t = bench_time(fns, chain=chain, host=host)
                base = name.replace(" (kernel only)", "").replace(" (pipelined)", "")
                if name.startswith("kernel default"):
                    base = "ours default layout"
                elif name.startswith("kernel"):
                    base = "ours affine 4b"
                rows.append(
                    dict(
                        heads=f"{hq}/{hkv}",
                        d=d,
                        n=n,
                        variant=name,
                        ms=t * 1e3,
                        dispatch_ms=host["dispatch"] * 1e3,
                        bytes=kv_bytes(base, hkv, n, d),
                    )
                )
                print(f"  {hq}/{hkv} d{d} n{n} {name:30s} {t * 1e3:8.3f} ms "
                      f"(host dispatch {host['dispatch'] * 1e3:.3f})", flush=True)  # fmt: skip
            del sets
            mx.clear_cache()
    return rows


LAYER_VARIANTS = [  # what a model layer pays per decode step (ours: rotations and joins included)
    "fp16", "mlx-lm affine 8b", "mlx-lm affine 4b", "v3 affine 4b (kernel only)",
    "ours default layout", "ours default layout (rows grid)",
    "ours default layout (D-major scales)", "ours default layout (fused join)",
    "ours default layout (two launches)", "ours affine 4b",
    "ours codebook 4b", "ours codebook 3b",
]  # fmt: skip
PLOT = ROOT / "docs" / "attention_gpu.png"


def table(rows, copy_bw) -> str:
    """Layer times, the kernel-only sweep, and bandwidth at the longest context."""
    from bench.report import context_label, markdown_table

    keys = sorted({(r["heads"], r["d"], r["n"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["heads"], r["d"], r["n"], r["variant"]): r for r in rows}

    def ms(h, d, n, v):
        r = by.get((h, d, n, v))
        return "-" if r is None else f"{r['ms']:.3f}"

    def ratio_of(h, d, n, v, base):
        f16, o = by.get((h, d, n, base)), by.get((h, d, n, v))
        return f"{f16['ms'] / o['ms']:.2f}x" if f16 and o else "-"

    def ratio(h, d, n, v):
        return ratio_of(h, d, n, v, "fp16")

    layer = [v for v in LAYER_VARIANTS if v in variants]
    head = ["heads q/kv, D, context"] + [f"{v} (ms)" for v in layer]
    head += ["default vs fp16", "affine 4b vs fp16"]
    t1 = markdown_table(
        head,
        [
            [f"{h}, {d}, {context_label(n)}"]
            + [ms(h, d, n, v) for v in layer]
            + [ratio(h, d, n, "ours default layout"), ratio(h, d, n, "ours affine 4b")]
            for h, d, n in keys
        ],
    )
    sweep = [v for v in variants if v not in LAYER_VARIANTS and not v.endswith("(pipelined)")]
    piped = [v for v in variants if v.endswith("(pipelined)")]
    t2 = markdown_table(
        ["heads q/kv, D, context"] + [f"{v} (ms)" for v in sweep],
        [[f"{h}, {d}, {context_label(n)}"] + [ms(h, d, n, v) for v in sweep] for h, d, n in keys],
    )
    bw = []
    for h, d, n in keys:
        if n < 131072:  # the long contexts are where bandwidth decides
            continue
        for v in variants:
            r = by.get((h, d, n, v))
            if r:
                gbs = r["bytes"] / (r["ms"] * 1e-3) / 1e9
                bw.append([f"{h}, {d}, {context_label(n)}", v, f"{r['bytes'] / 1e6:.1f}",
                           f"{r['bytes'] / copy_bw * 1e3:.3f}", f"{r['ms']:.3f}", f"{gbs:.0f}",
                           f"{100 * gbs * 1e9 / copy_bw:.0f}%"])  # fmt: skip
    t3 = markdown_table(
        ["shape", "variant", "K+V MB", "floor ms", "ms", "achieved GB/s", "of copy BW"], bw
    )
    parts = [
        "Per decode layer (one query token per head, calls chained; ours = the cache's "
        "attention as a layer calls it: the split kernel over the quantized body (it rotates "
        "the query; its last blocks take the full-precision sink and tail), then the join):\n\n"
        + t1
    ]
    if piped:
        t5 = markdown_table(
            ["heads q/kv, D, context"] + [f"{v} (ms)" for v in piped] + ["ours vs fp16"],
            [
                [f"{h}, {d}, {context_label(n)}"]
                + [ms(h, d, n, v) for v in piped]
                + [ratio_of(h, d, n, "ours default layout (pipelined)", "fp16 (pipelined)")]
                for h, d, n in keys
            ],
        )
        parts.append(
            "The same layers as a decode loop runs them (`pipelined_time`: each step a chain "
            "of 32 layers, built and encoded while the GPU runs the previous step, as "
            "mlx_lm.generate does; per layer the larger of host and GPU time):\n\n" + t5
        )
    if sweep:
        parts.append(
            "Kernel only (the split kernel without the join; independent calls), and the "
            "sweep (v5 loads: global loads straight into registers instead of the staged "
            "tiles; splits: blocks per SM the split count aims for):\n\n" + t2
        )
    if bw:
        parts.append(
            "Bytes each variant must read at 128K against the measured copy bandwidth:\n\n" + t3
        )
    if any("dispatch_ms" in r for r in rows):
        t4 = markdown_table(
            ["heads q/kv, D, context"] + [f"{v} (ms)" for v in layer],
            [
                [f"{h}, {d}, {context_label(n)}"]
                + [
                    f"{by[(h, d, n, v)]['dispatch_ms']:.3f}"
                    if "dispatch_ms" in by.get((h, d, n, v), {})
                    else "-"
                    for v in layer
                ]
                for h, d, n in keys
            ],
        )
        parts.append(
            "Host time per layer in `async_eval` (MLX encodes each kernel into a CUDA graph "
            "there; a graph runs once committed, so in the chained times above this host work "
            "is partly not hidden behind the GPU's):\n\n" + t4
        )
    return "\n".join(parts)


def plot(rows, path: Path = PLOT) -> None:
    """Decode time per layer vs context, one panel per shape (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["heads"], r["d"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, (h, d) in zip(axes[0], shapes, strict=True):
        for v in ("fp16", "mlx-lm affine 4b", "ours default layout", "ours affine 4b",
                  "ours codebook 3b"):  # fmt: skip
            pts = sorted(
                (r["n"], r["ms"]) for r in rows if (r["heads"], r["d"], r["variant"]) == (h, d, v)
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per layer",
               title=f"decode attention, {h} heads, D {d}")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", default="4096,32768,131072,262144")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--quick-checks", action="store_true", help="a subset of the checks")
    ap.add_argument("--check-runs", default="", help="check runs to do (indices 0-12)")
    ap.add_argument(
        "--check-lengths", default="", help="more lengths for the first shape: 131072,..."
    )
    ap.add_argument("--no-fold", action="store_true", help="scales applied per element")
    ap.add_argument("--fused-join", action="store_true", help="one launch a layer (checks too)")
    ap.add_argument("--check-layouts", default="", help="layout names to check (all)")
    ap.add_argument("--variants", default="", help="timing variants to run (all)")
    ap.add_argument("--v3-checks", action="store_true", help="also check the v3 kernel")
    ap.add_argument("--shapes", default="32/8/128,16/2/256", help="timing shapes q/kv/D")
    ap.add_argument("--checks-only", action="store_true")
    ap.add_argument("--tune", type=tune_arg, default={}, help="mma_decode tunables: WARPS=8,...")
    ap.add_argument(
        "--render", help="attention_gpu.json(s), comma-separated, to write into the docs"
    )
    ap.add_argument("--machine", default=None)
    ap.add_argument("--command", default=None)
    ap.add_argument("--note", default="", help="extra paragraph for the rendered section")
    ap.add_argument("--checks", default="", help="check JSONs (comma-separated) to report")
    ap.add_argument("--section", default="attention_gpu", help="the docs section --render writes")
    ap.add_argument("--title", default="Decode attention per layer on the GPU", help="its heading")
    args = ap.parse_args()
    if args.render:
        from bench.report import write_section

        # several result files (e.g. the chained D 128 and D 256 steps) go into one table
        files = [json.loads(Path(f).read_text()) for f in args.render.split(",")]
        res = dict(files[0], timings=[t for f in files for t in f["timings"]])
        checks = [
            c
            for f in args.checks.split(",")
            if f
            for c in json.loads(Path(f).read_text())["checks"]
        ]
        errs = [c["rel_err"] for c in checks]
        png = PLOT.with_name(f"{args.section}.png")  # (a section of its own: its own plot)
        plot(res["timings"], png)
        body = (
            f"MLX {res['mlx']}, {res['gpu']}; measured copy bandwidth "
            f"{res['copy_bw'] / 1e12:.2f} TB/s (read + write).\n\n"
            f"Correctness (the tensor-core kernel through real caches, joins included): "
            f"{sum(c['ok'] for c in checks)}/{len(checks)} checks against float64 within "
            f"{MMA_TOL:g} (max rel err {max(errs) if errs else float('nan'):.2e}).\n\n"
            + (args.note + "\n\n" if args.note else "")
            + table(res["timings"], res["copy_bw"])
            + f"\n![decode attention vs context]({png.name})\n"
        )
        write_section(
            args.section,
            args.title,
            body,
            machine=args.machine or res["gpu"],
            command=args.command,
        )
        return

    import mlx.core as mx

    km = load_kernels()
    settings = dict(FUSED_JOIN=True, FUSED_MAX_WORK=None) if args.fused_join else {}
    settings.update({"FOLD": False} if args.no_fold else {}, **args.tune)
    if settings:
        from services.turboquant.kernels import mma_decode

        mma_decode.tune(**settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpu = "?"
    res = {"mlx": mx.__version__, "gpu": gpu, "cuda": km.cuda_available()}
    print(res, flush=True)
    rng = np.random.default_rng(int(time.time()))

    def save(rows):
        (out / "attention_gpu_checks.json").write_text(json.dumps({"checks": rows}, indent=1))

    checks = []
    if not args.skip_checks:
        checks = run_mma_checks(
            rng, args.quick_checks, args.check_runs, save, args.check_layouts, args.check_lengths
        )
    if args.v3_checks:
        checks += run_checks(km, rng, quick=True)
    errs = [c["rel_err"] for c in checks]
    res.update(
        checks=checks,
        checks_total=len(checks),
        checks_passed=sum(c["ok"] for c in checks),
        checks_max_err=max(errs) if errs else float("nan"),
    )
    print(
        f"checks: {res['checks_passed']}/{res['checks_total']} max rel err {res['checks_max_err']:.3e}",
        flush=True,
    )
    (out / "attention_gpu.json").write_text(json.dumps(res, indent=1))
    res["copy_bw"] = copy_bandwidth()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.checks_only:
        return
    shapes = [tuple(int(x) for x in sh.split("/")) for sh in args.shapes.split(",")]
    res["timings"] = run_timings(km, contexts, shapes, args.variants)
    (out / "attention_gpu.json").write_text(json.dumps(res, indent=1))
    print(f"copy bandwidth {res['copy_bw'] / 1e12:.2f} TB/s")
    print(table(res["timings"], res["copy_bw"]))


if __name__ == "__main__":
    main()
