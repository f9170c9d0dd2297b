"""The end-to-end decode bench's plumbing on any machine (its numbers come from the GPU)."""

from __future__ import annotations

from bench import e2e_decode_gpu as e2e


def test_a_batch_decodes_and_its_host_time_is_split():
    model = e2e.build("llama-3.1-8b", tiny=True)
    kinds = ["fp16", "tq-default"]
    one = e2e.run_context(model, kinds, context=300, steps=2, repeats=2, batch=1)
    two = e2e.run_context(model, kinds, context=300, steps=2, repeats=2, batch=2)
    assert [r["cache"] for r in two] == kinds
    for a, b in zip(one, two, strict=True):
        assert b["batch"] == 2 and b["tok_s"] > 0 and len(b["tok_s_runs"]) == 2
        # every sequence of the batch holds its own keys and values
        assert 1.8 < b["kv_bytes"] / a["kv_bytes"] < 2.2
        for host in (b["host_ms"], b["unpipelined_ms"]):  # (a step alone: host, then the GPU)
            assert set(host) == {"build", "dispatch", "wait"}
            assert all(v >= 0 for v in host.values()) and host["build"] > 0
    assert two[0]["vs_first"] == 1.0  # fp16 against itself, run by run
    paired = [a / b for a, b in zip(two[1]["tok_s_runs"], two[0]["tok_s_runs"], strict=True)]
    assert min(paired) <= two[1]["vs_first"] <= max(paired)
    # the tq cache's KV is smaller than fp16's, and its peak does not count fp16's buffers
    assert two[1]["kv_bytes"] < two[0]["kv_bytes"]
    assert two[1]["peak_bytes"] < two[0]["peak_bytes"]


def test_quantized_weights_decode_and_render_in_their_own_rows(tmp_path, monkeypatch):
    """--weight-bits 4: the model's linear layers are quantized; its rows compare with the
    fp16 cache of the same weights, not with the fp16-weight model's."""
    import json

    import mlx.nn as nn

    model = e2e.build("llama-3.1-8b", tiny=True, weight_bits=4)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    rows = e2e.run_context(model, ["fp16", "tq-default"], context=200, steps=2, repeats=1)
    assert all(r["tok_s"] > 0 for r in rows)
    res = {"mlx": "x", "gpu": "cpu", "rows": [dict(model="m", weight_bits=4, **r) for r in rows]}
    plain = dict(rows[0], tok_s=rows[0]["tok_s"] * 10, vs_first=1.0)
    res["rows"].append(dict(model="m", weight_bits=16, **plain))
    f = tmp_path / "r.json"
    f.write_text(json.dumps(res))
    written = {}
    monkeypatch.setattr(
        "bench.report.write_section", lambda name, title, body, **kw: written.update(body=body)
    )
    e2e.render(str(f), "cpu", "cmd")
    lines = [ln for ln in written["body"].splitlines() if ln.startswith("| m |")]
    assert [ln.split("|")[2].strip() for ln in lines] == ["4-bit", "4-bit", "fp16"]
    # the 4-bit tq row's ratio is against the 4-bit fp16-cache row (its own paired runs)
    assert lines[1].split("|")[9].strip() == f"{rows[1]['vs_first']:.2f}x"
    # two processes' files: each row kept, by process (another sample, not a duplicate)
    e2e.render(f"{f},{f}", "cpu", "cmd")
    lines = [ln for ln in written["body"].splitlines() if ln.startswith("| m |")]
    assert [ln.split("|")[4].strip() for ln in lines] == ["1", "1", "2", "2", "1", "2"]


def test_dispatch_cost_times_a_chain_per_call():
    """bench/dispatch_cost.py's measurement on any device (its kinds with custom kernels
    need CUDA): per-call build, async_eval and wall time of a chain of calls."""
    import mlx.core as mx

    from bench.dispatch_cost import chain_cost

    calls = []

    def step(x):
        calls.append(1)
        return x + 1

    r = chain_cost(step, mx.zeros((16,)), nodes=8, repeat=3)
    assert len(calls) == 8 * 4  # a warm-up chain, then 3 timed ones
    assert set(r) == {"build_us", "dispatch_us", "wall_us"}
    assert all(v > 0 for v in r.values()) and r["wall_us"] >= r["dispatch_us"]


def test_chained_calls_are_timed_per_call_with_their_graph_build():
    """dispatch_cost's chains go through attention_gpu's timer (one helper for both)."""
    import mlx.core as mx

    from bench.dispatch_cost import chain_cost

    x = mx.zeros((1024,))
    mx.eval(x)

    def twenty_ops(v):
        for _ in range(20):
            v = v + 1
        return v

    one = chain_cost(lambda v: v + 1, x, nodes=32, repeat=3)
    many = chain_cost(twenty_ops, x, nodes=32, repeat=3)
    assert set(one) == {"build_us", "dispatch_us", "wall_us"}
    assert all(v > 0 for v in one.values())
    # per call: twenty graph nodes take longer to build than one
    assert many["build_us"] > 5 * one["build_us"]


def test_pipelined_time_runs_steps_of_chained_layers_on_the_last_output():
    """attention_gpu's decode-loop timing: every step a chain of layers whose first call
    takes the previous step's (lazy) output, as mlx_lm.generate pipelines decode."""
    import mlx.core as mx

    from bench.attention_gpu import pipelined_time

    x0 = mx.zeros((64,))
    mx.eval(x0)
    seen = []

    def layer(prev=None):
        seen.append(prev is None)
        return (x0 if prev is None else prev) + 1

    t = pipelined_time([layer], layers=4, steps=3, repeat=2)
    assert t > 0
    # warm-up: two steps (the first from the fixed query); each timed run: 1 + 3 steps
    assert len(seen) == 4 * 2 + 2 * 4 * (1 + 3)
    # only a step's first call of a run starts from the fixed query, all others chain on
    starts = [i for i, fresh in enumerate(seen) if fresh]
    assert starts == [0, 8, 24]


def test_dispatch_cost_times_our_layer_without_launches(monkeypatch):
    """The 'no launches' kind: our layer with stand-in kernels that add no graph node, so
    its build time is our Python alone (the GPU host's layer minus it: MLX's two calls)."""
    import mlx.core as mx

    from bench.attention_gpu import cache_sides, kv_cache_slices
    from bench.dispatch_cost import chain_cost
    from bench.host_time import CachedStandInKernel, hook_kernels
    from services.turboquant import TurboQuantConfig
    from services.turboquant.attention import (
        set_body_decode_kernel,
        set_layer_decode_kernel,
        turboquant_attention,
    )
    from services.turboquant.kernels import mma_decode

    monkeypatch.setattr(mx.fast, "cuda_kernel", mx.fast.cuda_kernel)  # restored after
    old = set_layer_decode_kernel(None), set_body_decode_kernel(None)
    try:
        hook_kernels(CachedStandInKernel)
        k, v = kv_cache_slices(2, 600, 64)
        q = mx.random.normal((1, 4, 1, 64)).astype(mx.float16)
        ks, vs = cache_sides(k, v, TurboQuantConfig.recommended())
        mx.eval(k, v, q, ks.parts, vs.parts)
        r = chain_cost(lambda x: turboquant_attention(x, ks, vs, 0.125), q, nodes=16, repeat=3)
        assert r["build_us"] > 0
        # every launch returned an evaluated array: nothing left to encode or run
        assert r["dispatch_us"] < r["build_us"]
        out = turboquant_attention(q, ks, vs, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype
    finally:
        set_layer_decode_kernel(old[0])
        set_body_decode_kernel(old[1])
        mma_decode.clear_kernel_caches()


def test_the_decode_kernels_are_built_before_the_timed_rounds(monkeypatch):
    """On CUDA, run_context first runs the sidecar's warm-up for each TurboQuant kind
    (warm_kernels -> kernels/warm.py), so no variant compiles inside a timed round: here as
    if on CUDA, with recorded stand-in kernels -- the split kernel of one launch a layer and
    of two (and the join) launch before the first timed step; fp16 warms nothing."""
    import mlx.core as mx

    from bench.host_time import CachedStandInKernel, hook_kernels
    from services.turboquant.attention import set_body_decode_kernel, set_layer_decode_kernel
    from services.turboquant.kernels import fused_decode, mma_decode

    launched = []

    class Recorded(CachedStandInKernel):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.name = kw["name"]

        def __call__(self, **kw):
            launched.append(self.name)
            return super().__call__(**kw)

    warmed, timed = [], []
    real_warm, real_rate = e2e.warm_kernels, e2e.decode_rate
    monkeypatch.setattr(e2e, "warm_kernels", lambda m, k: warmed.append(k) or real_warm(m, k))
    monkeypatch.setattr(
        e2e, "decode_rate", lambda *a, **kw: timed.append(len(launched)) or real_rate(*a, **kw)
    )
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)
    monkeypatch.setattr(mx.fast, "cuda_kernel", mx.fast.cuda_kernel)  # restored after
    old = set_layer_decode_kernel(None), set_body_decode_kernel(None)
    try:
        hook_kernels(Recorded)
        model = e2e.build("llama-3.1-8b", tiny=True)
        warmed_here = set()
        e2e.run_context(model, ["fp16", "tq-default"], context=200, steps=2, repeats=1,
                        warmed=warmed_here)  # fmt: skip
        first = len(launched)
        # a second context of the same model: its kernels are built, no warm-up again
        e2e.run_context(model, ["fp16", "tq-default"], context=230, steps=2, repeats=1,
                        warmed=warmed_here)  # fmt: skip
    finally:
        set_layer_decode_kernel(old[0])
        set_body_decode_kernel(old[1])
        mma_decode.clear_kernel_caches()
    assert warmed == ["tq-default"] and warmed_here == {"tq-default"}
    assert len(launched) > first and len(timed) > 2  # (the second context did run)
    before = launched[: timed[0]]  # (the first decode_rate: run_context's own warm-up)
    assert any(n.startswith("tq_mma_decode_join") for n in before)  # two launches a layer
    splits = {n for n in before if n.startswith("tq_mma_decode_split")}
    assert len(splits) >= 2  # (kernel names carry their template's digest: several variants)


def test_attention_table_reports_pipelined_layers_apart():
    """The decode-loop timings get their own table and ratio; they stay out of the chained
    table and the kernel-only sweep."""
    from bench.attention_gpu import table

    rows = [
        dict(heads="32/8", d=128, n=131072, variant=v, ms=ms, dispatch_ms=0.02, bytes=1)
        for v, ms in [("fp16", 0.146), ("ours default layout", 0.090),
                      ("fp16 (pipelined)", 0.140), ("ours default layout (pipelined)", 0.070)]
    ]  # fmt: skip
    text = table(rows, copy_bw=3.6e12)
    chained, _, rest = text.partition("The same layers as a decode loop runs them")
    assert "(pipelined)" not in chained.split("Bytes each variant")[0]
    assert "| 32/8, 128, 128K | 0.140 | 0.070 | 2.00x |" in rest
    assert "Kernel only" not in text  # no sweep variants in these rows


def test_join_kinds_force_the_kernels_join_only_while_their_steps_run(monkeypatch):
    """tq-fused / tq-unfused compare the CUDA kernel's two joins in one run: each kind's
    steps (warm-up and timed) see its setting, and the module's default comes back."""
    from services.turboquant.kernels import mma_decode

    default = mma_decode.FUSED_JOIN
    seen = []

    def decode_rate(model, cache, steps, host=None, batch=1):
        seen.append((id(cache), mma_decode.FUSED_JOIN))
        return 1.0

    monkeypatch.setattr(e2e, "decode_rate", decode_rate)
    model = e2e.build("llama-3.1-8b", tiny=True)
    kinds = ["fp16", "tq-fused", "tq-unfused", "tq-default"]
    rows = e2e.run_context(model, kinds, context=40, steps=1, repeats=2)
    assert [r["cache"] for r in rows] == kinds
    flags = [flag for _, flag in seen]
    # per round (warm-up, then two timed): the kinds in order
    assert flags == [default, True, False, default] * 3
    assert mma_decode.FUSED_JOIN is default


def test_tune_sets_kernel_tunables_by_name_and_forgets_old_plans(monkeypatch):
    """bench --tune: ``WARPS=8,PIPELINE=False,STEPS=None`` parses to values, mma_decode.tune
    sets them (plans made before are dropped), and a name that is no tunable is refused."""
    import pytest

    from bench.report import tune_arg
    from services.turboquant.kernels import mma_decode

    assert tune_arg("WARPS=8,PIPELINE=False,STEPS=None") == dict(
        WARPS=8, PIPELINE=False, STEPS=None
    )
    assert tune_arg("") == {}
    for name in mma_decode.TUNABLES:
        monkeypatch.setattr(mma_decode, name, getattr(mma_decode, name))  # restored after
    generation = mma_decode._GENERATION
    mma_decode.tune(**tune_arg("WARPS=8,PIPELINE=False"))
    assert (mma_decode.WARPS, mma_decode.PIPELINE) == (8, False)
    assert mma_decode._GENERATION == generation + 1  # memos made before are not used
    with pytest.raises(ValueError, match="warps"):
        mma_decode.tune(warps=4)
    with pytest.raises(ValueError, match="SPLIT_INPUTS"):
        mma_decode.tune(SPLIT_INPUTS=())
    assert mma_decode.WARPS == 8


def test_build_profile_names_the_caches_functions():
    """--profile: a cProfile of decode steps' graph builds alone, our cache's functions in it."""
    from services.turboquant import TurboQuantConfig, make_turboquant_cache

    model = e2e.build("llama-3.1-8b", tiny=True)
    cache = make_turboquant_cache(model, TurboQuantConfig.recommended())
    e2e.attention_shapes(model, cache)
    e2e.fill(cache, 200)
    text = e2e.profile_builds(model, cache, steps=3, batch=1, top=40)
    assert "function calls" in text and "update_and_fetch" in text


def test_calls_time_each_cache_update_and_attention_inside_the_model(monkeypatch, capsys):
    """--calls: after the timed runs, each kind's build a layer -- the whole step and the
    cache update and attention calls inside it, by the kind's own timers."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    import services.turboquant.patch as patch
    from services.turboquant import TurboQuantKVCache

    # time_calls wraps these for the rest of a bench's process: put them back after the test
    monkeypatch.setattr(e2e, "_CALLS", None)
    for owner, name in ((KVCache, "update_and_fetch"), (TurboQuantKVCache, "update_and_fetch"),
                        (patch, "turboquant_attention"),
                        (mx.fast, "scaled_dot_product_attention")):  # fmt: skip
        monkeypatch.setattr(owner, name, getattr(owner, name))
    model = e2e.build("llama-3.1-8b", tiny=True)
    e2e.run_context(model, ["fp16", "tq-default"], context=40, steps=1, repeats=1, calls=3)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "build a layer" in ln]
    assert [ln.split("(us): ")[1].split(" {")[0] for ln in lines] == ["fp16", "tq-default"]
    fp16, ours = (eval(ln.split(" ", 6)[-1]) for ln in lines)  # noqa: S307 - our own dict repr
    assert set(fp16) == {"step", "fp16 update", "fp16 attention"}
    assert set(ours) == {"step", "ours update", "ours attention"}
    for got in (fp16, ours):  # per layer: the calls are inside the step
        assert 0 < sum(v for k, v in got.items() if k != "step") < got["step"]


def test_host_time_counts_fewer_opcodes_with_the_decode_memo(monkeypatch):
    """bench/host_time.py --opcodes: our Python a decode layer, counted (steady where timings
    are not); the decode memo's steady path must show in it, the model's own code not."""
    import mlx.core as mx

    from bench.host_time import CachedStandInKernel, count_opcodes, hook_kernels
    from services.turboquant import TurboQuantConfig, make_turboquant_cache
    from services.turboquant.attention import set_body_decode_kernel, set_layer_decode_kernel
    from services.turboquant.kernels import fused_decode, mma_decode

    from .tiny_models import tiny_llama

    monkeypatch.setattr(mx.fast, "cuda_kernel", mx.fast.cuda_kernel)  # restored after
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)  # workspaces, ropes
    old = set_layer_decode_kernel(None), set_body_decode_kernel(None)
    try:
        hook_kernels(CachedStandInKernel)
        model = tiny_llama(layers=2)
        prompt = mx.random.randint(0, 256, (1, 300), key=mx.random.key(0))
        counts = {}
        for memo in (True, False):  # the same steps of two caches (a block quantized alike)
            monkeypatch.setattr(mma_decode, "DECODE_MEMO", memo)
            cache = make_turboquant_cache(model, TurboQuantConfig.recommended(group_size=64))
            mx.eval(model(prompt, cache=cache))
            count_opcodes(model, cache, 4)  # (plans first)
            counts[memo] = count_opcodes(model, cache, 16)  # (a tail chunk: 16 steps)
        steady, planned = counts[True], counts[False]
        assert 0 < steady["ours"] < planned["ours"]
        assert steady["ours calls"] < planned["ours calls"]
        assert 0 < steady["other"] <= planned["other"]  # (the model, and what planning calls)
    finally:
        set_layer_decode_kernel(old[0])
        set_body_decode_kernel(old[1])
        mma_decode.clear_kernel_caches()


def test_the_lean_llama_keeps_the_attention_and_drops_most_weights():
    """llama-3.1-8b-lean: Llama-3.1-8B's attention shapes with a token's MLP and vocabulary
    (an in-model timing experiment without most of the weights' traffic); names checked."""
    import pytest

    lean, full = e2e.MODELS["llama-3.1-8b-lean"], e2e.MODELS["llama-3.1-8b"]
    attention = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "rope_theta")  # fmt: skip
    assert all(lean[k] == full[k] for k in attention)
    h = full["hidden_size"]

    def weights(c):  # a layer's projections and MLP, the embeddings and head
        qkvo = h * c["head_dim"] * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
        per_layer = qkvo + 3 * h * c["intermediate_size"]
        return c["num_hidden_layers"] * per_layer + 2 * h * c["vocab_size"]

    assert weights(lean) < 0.2 * weights(full)
    model = e2e.build("llama-3.1-8b-lean", tiny=True)  # (tiny: its shapes shrink as Llama's)
    assert len(model.layers) == e2e.TINY["num_hidden_layers"]
    with pytest.raises(ValueError, match="--models"):
        e2e.build("llama-9", tiny=True)
