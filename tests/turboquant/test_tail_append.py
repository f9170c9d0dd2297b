"""A decode step's new positions on CUDA (cache.TailAppend): the tail counts them at once, the
layer kernel writes them into the tail buffer as it reads them, and every other reader gets
them written by MLX ops first. On any machine: the cache as on CUDA (a join workspace), the
kernel a recording stand-in or absent (the portable path). The kernel's own reads and writes
are checked on the GPU (bench/attention_gpu.py, check run 11)."""

from __future__ import annotations

import copy
import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from services.turboquant import TurboQuantConfig, TurboQuantKVCache, install_patch
from services.turboquant.attention import turboquant_attention
from services.turboquant.kernels import fused_decode, mma_decode
from services.turboquant.kernels.fused_decode import LOG2E

from .test_decode_fastpath import _Recorder
from .test_segments import _kv

CFG = TurboQuantConfig.recommended(group_size=64)  # channel keys: a tail of up to 64 + window


@pytest.fixture
def on_cuda(monkeypatch):
    install_patch()
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)


def _caches(n_prompt, k, v, writes=True):
    c = TurboQuantKVCache(CFG)
    c.KERNEL_WRITES_TAIL = writes
    c.update_and_fetch(k[:, :, :n_prompt], v[:, :, :n_prompt])
    return c


def test_untaken_positions_are_written_before_any_other_read(on_cuda):
    """No layer kernel (the portable path): each step's output, the states and trims are
    those of a cache that writes every step with MLX ops."""
    k, v = _kv(260, dtype=mx.float16)
    q = mx.random.normal((1, 4, 1, 64)).astype(mx.float16)
    got, want = _caches(100, k, v), _caches(100, k, v, writes=False)
    deferred = 0
    for i in range(100, 260):
        if i == 200:
            assert got.trim(3) == want.trim(3) == 3  # (the last step's position first)
        a = got.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        b = want.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        assert b[0].append is None
        deferred += a[0].append is not None
        out_a = turboquant_attention(q, *a, scale=0.125)
        out_b = turboquant_attention(q, *b, scale=0.125)
        np.testing.assert_array_equal(np.array(out_a), np.array(out_b))
        if i % 50 == 0:
            for x, y in zip(got.state, want.state, strict=True):
                np.testing.assert_array_equal(np.array(x), np.array(y))
    assert deferred > 120  # all but the steps that quantize a block (or follow one)


def test_a_taken_step_is_left_to_its_kernel_and_ordered_after_it(on_cuda, monkeypatch):
    """The layer kernel gets kn, vn and the last writer; the cache then writes nothing itself
    (the position stays as the kernel left it: here the stand-in wrote nothing) and runs the
    kernel to its end before a state reads the tail."""
    mma_decode.clear_kernel_caches()
    monkeypatch.setattr(mx.fast, "cuda_kernel", _Recorder)
    _Recorder.calls, _Recorder.launches, _Recorder.outputs = [], [], []
    queued = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: queued.append(a) or real_eval(*a))
    try:
        k, v = _kv(140, dtype=mx.float16)
        cache = _caches(100, k, v)
        cache.update_and_fetch(k[:, :, 100:101], v[:, :, 100:101])  # (a new tail buffer)
        q = mx.random.normal((1, 4, 1, 64)).astype(mx.float16)
        last = None
        for i in range(101, 106):
            keys, values = cache.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
            append = keys.append
            assert append is not None and append.after is last
            out = mma_decode.mma_decode_layer(q, keys, values, 0.125)
            kernel, kw, outs = _Recorder.calls[-1]
            given = dict(zip(kernel.input_names, kw["inputs"], strict=True))
            assert given["kn"] is append.k and given["vn"] is append.v
            assert given["after"] is (q if last is None else last)
            # the whole tail buffers and the tail's length, counting the new position already
            # (cache.BufferedTail: no tail view cut for the kernel)
            n_tail = keys.tail_buf[1]
            assert given["kt"] is keys.tail_buf[0] and given["vt"] is values.tail_buf[0]
            assert "_cut" not in keys.__dict__ and "_cut" not in values.__dict__
            assert given["kt"].shape[2] > n_tail == i + 1 - keys.head.shape[2] - keys.n_body
            np.testing.assert_allclose(np.array(given["params"])[:2], [0.125 * LOG2E, n_tail])
            assert _Recorder.launches[-1][2]["TLEN"]  # (the kernel reads params[1])
            assert keys.tail.shape[2] == n_tail  # (cut when read by anything else)
            assert append.writer is out and last is not out
            last = out
        writers = lambda: [a for a in queued if any(a[0] is o for o, *_ in _Recorder.outputs)]  # noqa: E731
        assert not writers()  # decode steps order their kernels through "after", not an eval
        tail = np.array(cache.state[2])
        assert [a[0] for a in writers()] == [last]  # the state ran the last kernel first
        # the stand-in wrote nothing: every position the kernels took is as allocated (zeros)
        assert not tail[:, :, -5:].any() and tail[:, :, :-5].any()
    finally:
        mma_decode.clear_kernel_caches()


def test_a_copy_never_writes_into_the_buffer_of_its_original(on_cuda):
    k, v = _kv(200, dtype=mx.float16)
    k2, v2 = _kv(200, seed=7, dtype=mx.float16)
    a = _caches(100, k, v)
    for i in range(100, 110):
        a.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert a._pending is not None
    b = copy.deepcopy(a)  # prompt-cache reuse: the copy goes on with other tokens
    assert a._pending is None and b._pending is None  # settled before copying
    for i in range(110, 125):  # (the tail stays below a block: no quantization in between)
        a.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        b.update_and_fetch(k2[:, :, i : i + 1], v2[:, :, i : i + 1])
        # (a kernel writes in place: the copy must hold a buffer of its own, not share one)
        assert _address(a._tail_buf[0]) != _address(b._tail_buf[0])
    ta, tb = np.array(a.state[2]), np.array(b.state[2])
    np.testing.assert_array_equal(ta[:, :, -15:], np.array(k[:, :, 110:125]))
    np.testing.assert_array_equal(tb[:, :, -15:], np.array(k2[:, :, 110:125]))
    np.testing.assert_array_equal(ta[:, :, :-15], tb[:, :, :-15])  # the shared positions
    np.testing.assert_array_equal(ta[:, :, -25:-15], np.array(k[:, :, 100:110]))


def _address(x: mx.array) -> int:
    mx.eval(x)
    return np.array(x, copy=False).__array_interface__["data"][0]


def test_sides_kept_past_the_next_step_still_read_their_own_positions(on_cuda):
    """A path other than the kernel reads the step's sides after the cache has moved on (and
    written the step's positions into a new buffer state): it gets the sides' own tail and
    the step's positions, not the cache's current ones."""
    k, v = _kv(120, dtype=mx.float16)
    q = mx.random.normal((1, 4, 1, 64)).astype(mx.float16)
    got, want = _caches(100, k, v), _caches(100, k, v, writes=False)
    for i in range(100, 104):
        a = got.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        b = want.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert a[0].append is not None
    for i in range(104, 106):  # the cache goes on
        got.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        want.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
    out_a = turboquant_attention(q, *a, scale=0.125)
    out_b = turboquant_attention(q, *b, scale=0.125)
    np.testing.assert_array_equal(np.array(out_a), np.array(out_b))


def test_a_decode_step_cuts_no_tail_view_unless_something_reads_it(on_cuda):
    """cache.BufferedTail: a deferred step's sides carry the tail buffer and the tail's
    length; the tail is cut only for a reader that asks (the same positions as the views
    the cache cut every step before, BUFFERED_TAIL False), and a copied side keeps it."""
    k, v = _kv(160, dtype=mx.float16)
    got, want = _caches(100, k, v), _caches(100, k, v)
    want.BUFFERED_TAIL = False
    buffered = 0
    for i in range(100, 160):
        a = got.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        b = want.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        assert b[0].tail_buf is None and b[1].tail_buf is None
        if a[0].append is None:  # (a block step, or the one after it: views, as before)
            assert a[0].tail_buf is None
            continue
        buffered += 1
        assert got._tail_uncut == a[0].tail_buf[1] == a[1].tail_buf[1]
        assert a[0].tail_buf[0] is got._tail_buf[0] and a[1].tail_buf[0] is got._tail_buf[1]
        assert "_cut" not in a[0].__dict__  # nothing cut so far
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.array(x.tail), np.array(y.tail))
        assert got._tail_uncut is not None  # (a side's cut is its own: the cache stays uncut)
        side = dataclasses.replace(a[0], workspace=None)
        assert side.tail_buf is None and side.tail is a[0].tail
    assert buffered > 40
    for x, y in zip(got.state, want.state, strict=True):  # (the state cuts the cache's tail)
        np.testing.assert_array_equal(np.array(x), np.array(y))
    assert got._tail_uncut is None
