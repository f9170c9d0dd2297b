"""The decode memo (mma_decode.DECODE_MEMO): a fused layer's launch reused from the layer's
JoinWorkspace while the cache's body views stay the same objects. Every launch it makes must
be the one the planned path makes: the same kernel, the same input arrays in the same order,
grid, threadgroup, outputs and init value -- on any machine, with a recording stand-in."""

from __future__ import annotations

import copy
import dataclasses
import operator

import mlx.core as mx
import numpy as np
import pytest

from services.turboquant.kernels import mma_decode

from .test_kernels import _RecordedKernel, base_name

COMPUTED = ("cshift", "sinks")  # inputs made from the call's arguments each call: equal values


class _Recorder(_RecordedKernel):
    """A ``_RecordedKernel`` that keeps each launch's keyword arguments too, and, like a built
    CUDA kernel, cannot be copied."""

    calls: list = []

    def __call__(self, **kw):
        outs = super().__call__(**kw)
        self.calls.append((self, kw, outs))
        return outs

    def __deepcopy__(self, _memo):
        raise TypeError("a built kernel does not copy")


@pytest.fixture
def launches(monkeypatch):
    mma_decode.clear_kernel_caches()
    monkeypatch.setattr(mx.fast, "cuda_kernel", _Recorder)
    _Recorder.calls, _Recorder.launches, _Recorder.outputs = [], [], []
    yield _Recorder.calls
    mma_decode.clear_kernel_caches()  # no stand-in outlives the test


def layer(monkeypatch, memo: bool, *args, **kw):
    """One layer call, the memo on or off; returns (output, its launches, plans it asked)."""
    monkeypatch.setattr(mma_decode, "DECODE_MEMO", memo)
    first, plans = len(_Recorder.calls), _plans()
    out = mma_decode.mma_decode_layer(*args, **kw)
    return out, _Recorder.calls[first:], _plans() - plans


def _plans() -> int:
    info = mma_decode._layer_plan.cache_info()
    return info.hits + info.misses


def assert_same_launches(got: list, want: list) -> None:
    assert len(got) == len(want) > 0
    made, want_made = [], []  # the outputs of the launches so far: a join's inputs
    for (kernel, kw, outs), (want_kernel, want_kw, want_outs) in zip(got, want, strict=True):
        assert kernel is want_kernel and kw.keys() == want_kw.keys()
        names = kernel.input_names
        assert len(kw["inputs"]) == len(want_kw["inputs"]) == len(names)
        for name, a, b in zip(names, kw["inputs"], want_kw["inputs"], strict=True):
            if name in COMPUTED:
                assert a.dtype == b.dtype and mx.array_equal(a, b).item(), name
            elif any(a is m for m in made):
                assert [a is m for m in made] == [b is m for m in want_made], name
            else:
                assert a is b, name
        made, want_made = made + outs, want_made + want_outs
        for arg in ("grid", "threadgroup", "output_shapes", "output_dtypes", "init_value"):
            assert kw[arg] == want_kw[arg], arg


def _cuda_cache(monkeypatch, **config):
    """A cache that makes its join workspace as on CUDA."""
    from services.turboquant import TurboQuantKVCache, install_patch
    from services.turboquant.kernels import fused_decode

    install_patch()
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)
    return TurboQuantKVCache(**config)


@pytest.mark.parametrize(
    "config,dim,prompt,steps",
    [
        # per-channel keys (the default layout): the body grows by a group of 64 positions,
        # the tail crosses chunks of 16 (35 -> 63, then 0 after the block)
        (dict(key_quantizer="channel", group_size=64, sink_tokens=1), 128, 100, 34),
        # per-vector keys, a key centre and learned sinks: the body grows every step
        (dict(sink_tokens=2), 64, 80, 20),
        (dict(quantizer="codebook", key_bits=3, value_bits=3), 128, 80, 6),
    ],
)
def test_decode_steps_launch_as_planned_with_the_memo(monkeypatch, launches, config, dim,
                                                      prompt, steps):  # fmt: skip
    rng = np.random.default_rng(1)
    cache = _cuda_cache(monkeypatch, **config)
    hq, hkv = 8, 2
    kv = lambda n: mx.array(rng.standard_normal((1, hkv, n, dim)).astype(np.float16))  # noqa: E731
    sinks = (
        mx.array(rng.standard_normal(hq).astype(np.float32)) if "sink_tokens" in config else None
    )
    cache.update_and_fetch(kv(prompt), kv(prompt))
    seen, hits, body = set(), 0, None
    for _ in range(steps):
        keys, values = cache.update_and_fetch(kv(1), kv(1))
        work = keys.workspace
        assert work is not None
        if keys.n_body != body:  # new views: the memo of the old ones is gone with them
            assert work.decode_memo is None
        q = mx.array(rng.standard_normal((1, hq, 1, dim)).astype(np.float16))
        args = (q, keys, values, 1 / dim**0.5, sinks)
        out, first, plans = layer(monkeypatch, True, *args)
        again, second, plans_again = layer(monkeypatch, True, *args)
        _, planned, _ = layer(monkeypatch, False, *args)
        assert_same_launches(first, planned)
        assert_same_launches(second, planned)
        assert [base_name(k.name) for k, *_ in planned] == ["tq_mma_decode_split"]  # fused
        assert out is _Recorder.outputs[len(_Recorder.calls) - 3][0]
        assert again is _Recorder.outputs[len(_Recorder.calls) - 2][0]
        assert plans_again == 0  # the second call of a step took the memo
        # (the step's new position taken by the kernel or not: TailAppend, another plan)
        state = (keys.n_body, -(-keys.tail.shape[2] // 16), keys.append is None)
        if body == keys.n_body and state in seen:
            assert plans == 0  # nothing the plan reads changed since the last step
            hits += 1
        seen.add(state)
        body = keys.n_body
    if config.get("key_quantizer") == "channel":  # the steps covered what they should
        assert len({n for n, *_ in seen}) == 2 and len({c for _, c, _ in seen}) >= 3 and hits > 20
        assert {a for *_, a in seen} == {True, False}  # steps after a block's first one defer
    copy.deepcopy(cache)  # a copied cache (prompt-cache reuse): the memo is not copied


# The layer in one launch (the split kernel joins), or in two (past FUSED_MAX_WORK: long
# contexts, few KV heads) -- the memo and the steady path take both.
FUSED = pytest.mark.parametrize("fused", [True, False], ids=["one-launch", "split-then-join"])


@FUSED
@pytest.mark.parametrize("rope", [False, True], ids=["rope-by-mlx", "rope-in-kernel"])
def test_the_steady_path_launches_what_the_plan_does(monkeypatch, launches, rope, fused):
    """steady_decode_layer (a decode step in one frame) answers the steps between blocks
    and tail chunks, and launches exactly what planning afresh launches -- with the step's
    RoPE left to the kernel (PendingRope) or not; a query one position off is not its."""
    import mlx.nn as nn

    from services.turboquant.rope_fusion import DeferringRope, PendingRope, rope_spec

    if not fused:
        monkeypatch.setattr(mma_decode, "FUSED_MAX_WORK", 1)
    rng = np.random.default_rng(2)
    cache = _cuda_cache(monkeypatch, key_quantizer="channel", group_size=64, sink_tokens=1)
    kv = lambda n: mx.array(rng.standard_normal((1, 2, n, 128)).astype(np.float16))  # noqa: E731
    wrap = DeferringRope(nn.RoPE(128), rope_spec(nn.RoPE(128)))
    answered = []
    real = mma_decode.steady_decode_layer
    monkeypatch.setattr(
        mma_decode, "steady_decode_layer", lambda *a: answered.append(real(*a)) or answered[-1]
    )
    cache.update_and_fetch(kv(100), kv(100))
    steps, off = 40, 0
    for i in range(steps):
        keys, values = cache.update_and_fetch(kv(1), kv(1))
        q = mx.array(rng.standard_normal((1, 8, 1, 128)).astype(np.float16))
        if rope and keys.append is not None:
            last = keys.head.shape[2] + keys.n_body + keys.tail_buf[1] - 1
            keys.append.k = PendingRope(keys.append.k, wrap, last)
            q = PendingRope(q, wrap, last)
        args = (q, keys, values, 0.1)
        first = layer(monkeypatch, True, *args)[1]
        n = len(answered)
        out, second, plans = layer(monkeypatch, True, *args)
        planned = layer(monkeypatch, False, *args)[1]
        assert len(planned) == (1 if fused else 2)
        assert_same_launches(first, planned)
        assert_same_launches(second, planned)
        if keys.append is not None:  # (a step that quantized a block writes by MLX ops)
            assert plans == 0 and len(answered) == n + 1 and answered[n] is out  # steady took it
        if rope and keys.append is not None and i % 5 == 4:
            # a query of another position: not steady's (then MLX rotates the step's key)
            layer(monkeypatch, True, PendingRope(q.x, wrap, q.offset + 1), keys, values, 0.1)
            assert answered[-1] is None
            off += 1
    assert sum(a is not None for a in answered) > steps  # and most first calls too
    assert off >= 6 if rope else off == 0


@FUSED
def test_a_tail_chunk_step_switches_the_memo_to_its_plan(monkeypatch, launches, fused):
    """When the tail crosses into its next chunk of 16 positions, the step takes the plan the
    layer's memo made for that chunk count (_DecodeMemo.chain): no plan asked and the same
    memo, where it used to make both again; only a block's step (its body grew) plans. The
    launches are what planning afresh launches."""
    if not fused:
        monkeypatch.setattr(mma_decode, "FUSED_MAX_WORK", 1)
    rng = np.random.default_rng(5)
    cache = _cuda_cache(monkeypatch, key_quantizer="channel", group_size=64, sink_tokens=1)
    kv = lambda n: mx.array(rng.standard_normal((1, 2, n, 128)).astype(np.float16))  # noqa: E731
    cache.update_and_fetch(kv(100), kv(100))
    crossed, memo, body, chunks = 0, None, None, None
    for _ in range(80):
        keys, values = cache.update_and_fetch(kv(1), kv(1))
        q = mx.array(rng.standard_normal((1, 8, 1, 128)).astype(np.float16))
        out, got, plans = layer(monkeypatch, True, q, keys, values, 0.1)
        assert_same_launches(got, layer(monkeypatch, False, q, keys, values, 0.1)[1])
        now = -(-keys.tail_buf[1] // mma_decode.MMA_FP_CHUNK) if keys.append else None
        if now is not None and chunks is not None and keys.n_body == body:  # (a steady step)
            assert plans == 0 and keys.workspace.decode_memo is memo
            assert memo.chunks == now and memo.split.grid == got[0][1]["grid"]
            crossed += now != chunks
        memo, body, chunks = keys.workspace.decode_memo, keys.n_body, now
    assert crossed >= 4  # (tails of 37 -> 63, then 2 -> 52 positions: chunks 3 -> 4, 1 -> 4)


def _fused_case():
    from services.turboquant import TurboQuantConfig
    from services.turboquant.cache import JoinWorkspace
    from services.turboquant.kernels.cases import cache_case

    config = TurboQuantConfig(key_quantizer="channel", group_size=128, sink_tokens=1)
    c = cache_case(np.random.default_rng(0), config, batch=1, q_heads=8, kv_heads=2, dim=128,
                   length=4100, sinks=False)  # fmt: skip
    keys = dataclasses.replace(c.keys, workspace=JoinWorkspace())
    return c.queries.astype(mx.float16), keys, c.values


SETTINGS = [  # a value of each module setting the plan reads that changes the launch
    ("STEPS", 4),
    ("SPLIT_FACTOR", 0.02),  # (past the short contexts' rule: SHORT_BODY 0, see PRE)
    ("SHORT_BODY", 0),
    ("SHORT_ROWS", 0),
    ("JOIN_STAGE", False),
    ("WARPS", 2),
    ("FOLD", False),
    ("PIPELINE", False),
    ("LINEAR_GRID", False),
    ("FUSED_JOIN", False),
    ("FUSED_MAX_WORK", 1),
    ("FUSED_MAX_TAIL", 1),
    ("JOIN_COUNTER_ROWS", 0),
]


# set before the first call: the short contexts' rule takes no SPLIT_FACTOR
PRE = {"SPLIT_FACTOR": {"SHORT_BODY": 0}}


@pytest.mark.parametrize("name,value", SETTINGS, ids=[n for n, _ in SETTINGS])
def test_a_changed_setting_takes_effect_on_the_next_call(monkeypatch, launches, name, value):
    for pre, v in PRE.get(name, {}).items():
        monkeypatch.setattr(mma_decode, pre, v)
    q, keys, values = _fused_case()
    layer(monkeypatch, True, q, keys, values, 0.1)
    _, before, plans = layer(monkeypatch, True, q, keys, values, 0.1)
    assert plans == 0 and keys.workspace.decode_memo is not None  # the memo answered
    monkeypatch.setattr(mma_decode, name, value)
    _, after, _ = layer(monkeypatch, True, q, keys, values, 0.1)
    _, planned, _ = layer(monkeypatch, False, q, keys, values, 0.1)
    assert_same_launches(after, planned)
    with pytest.raises(AssertionError):
        assert_same_launches(after, before)  # the setting changed the launch


def test_clearing_the_kernel_caches_drops_the_memo(monkeypatch, launches):
    q, keys, values = _fused_case()
    for _ in range(2):
        layer(monkeypatch, True, q, keys, values, 0.1)
    ((kernel, *_),) = _Recorder.calls[-1:]

    class Swapped(_Recorder):
        pass

    mma_decode.clear_kernel_caches()
    monkeypatch.setattr(mx.fast, "cuda_kernel", Swapped)
    _, after, plans = layer(monkeypatch, True, q, keys, values, 0.1)
    ((new, *_),) = after
    assert plans == 1 and type(new) is Swapped and new is not kernel


def test_without_a_workspace_every_call_plans(monkeypatch, launches):
    # off CUDA the cache gives no workspace: the layer plans as before (split + join)
    q, keys, values = _fused_case()
    keys = dataclasses.replace(keys, workspace=None)
    for _ in range(2):
        _, got, plans = layer(monkeypatch, True, q, keys, values, 0.1)
        _, planned, _ = layer(monkeypatch, False, q, keys, values, 0.1)
        assert plans == 1
        assert_same_launches(got, planned)
        assert [base_name(k.name) for k, *_ in got] == ["tq_mma_decode_split", "tq_mma_decode_join"]


def test_a_poisoned_call_plans_and_other_views_miss(monkeypatch, launches):
    q, keys, values = _fused_case()
    layer(monkeypatch, True, q, keys, values, 0.1)
    _, got, plans = layer(monkeypatch, True, q, keys, values, 0.1, poison=True)
    assert plans == 1 and got[0][1]["init_value"] != got[0][1]["init_value"]  # NaN
    # the same arrays in another views tuple, another scale, sinks: planned again
    other = dataclasses.replace(keys, parts=(*keys.parts,))
    for args in (
        (q, other, values, 0.1),
        (q, keys, values, 0.2),
        (q, keys, values, 0.1, mx.zeros(8)),
    ):
        layer(monkeypatch, True, q, keys, values, 0.1)  # the memo of this call
        _, got, plans = layer(monkeypatch, True, *args)
        _, planned, _ = layer(monkeypatch, False, *args)
        assert plans == 1
        assert_same_launches(got, planned)


def _update_defers(cache) -> bool:
    """What the update's own checks say of a one-position float16 step: the layer kernel
    writes it (defers_rope's rule, written out of ``_fast`` and ``_deferrable``)."""
    buf = cache._tail_buf
    return bool(
        buf is not None
        and cache.body_len > 0
        and cache._fast(buf, 1)
        and cache._deferrable(buf, 1, mx.float16)
    )


@pytest.mark.parametrize("window", [0, 20])
def test_defers_rope_answers_as_the_update_decides(monkeypatch, window):
    """``defers_rope`` (a step's rope asks it; the update then skips its own checks) must
    say what ``_fast`` and ``_deferrable`` say for one position, through blocks, buffer
    growth and windows."""
    rng = np.random.default_rng(3)
    cache = _cuda_cache(monkeypatch, key_quantizer="channel", group_size=64, window=window)
    kv = lambda n: mx.array(rng.standard_normal((1, 2, n, 64)).astype(np.float16))  # noqa: E731
    cache.update_and_fetch(kv(90), kv(90))
    said = []
    for step in range(150):
        got = cache.defers_rope(mx.float16, 64, 64)
        assert got == _update_defers(cache), step
        assert not cache.defers_rope(mx.float32, 64, 64)  # (another dtype than the buffer's)
        said.append(got)
        cache.update_and_fetch(kv(1), kv(1))
    assert True in said and False in said


def test_an_armed_step_is_what_checking_afresh_gives(monkeypatch):
    """A deferred step leaves ``_armed`` (the buffer tuple it made): while that tuple is still
    the buffer, the next step skips ``defers_rope``'s rule but the tail's length and the
    views memo's checks. Its answers and its views' fields must be what checking afresh
    gives -- through blocks, a trim, a state round trip, a copy and a tail set from outside."""
    from services.turboquant.cache import join_workspace

    rng = np.random.default_rng(4)
    cache = _cuda_cache(monkeypatch, key_quantizer="channel", group_size=64, window=8)
    kv = lambda n: mx.array(rng.standard_normal((1, 2, n, 64)).astype(np.float16))  # noqa: E731
    cache.update_and_fetch(kv(90), kv(90))
    events = {
        30: lambda c: c.trim(3) and c,
        45: lambda c: setattr(c, "state", c.state) or c,
        60: lambda c: copy.deepcopy(c),
        75: lambda c: setattr(c, "tail_k", c.tail_k) or setattr(c, "tail_v", c.tail_v) or c,
    }
    armed = 0
    for step in range(130):
        if step in events:
            cache = events[step](cache)
        armed += cache._armed is not None and cache._armed[0] is cache._tail_buf
        assert cache.defers_rope(mx.float16, 64, 64) == _update_defers(cache), step
        keys, values = cache.update_and_fetch(kv(1), kv(1))
        k_parts, v_parts = cache._body_views()
        for side, parts, head, center, work in (
            (keys, k_parts, cache.head_k, cache.key_center, join_workspace(cache)),
            (values, v_parts, cache.head_v, None, None),
        ):
            assert len(side.parts) == len(parts) and all(map(operator.is_, side.parts, parts))
            assert side.head is head and side.center is center and side.workspace is work
            assert side.body_len == cache.body_len and side.seed == cache.seed, step
        assert keys.spec is cache.key_spec(64) and values.spec is cache.value_spec(64)
        assert keys.shape[2] == cache.offset, step
    assert armed > 60  # (most steps took the shortcut)
