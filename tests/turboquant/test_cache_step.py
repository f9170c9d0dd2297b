"""The decode step's fast path (TurboQuantKVCache.DECODE_FAST_PATH): the tail's lengths kept
as ints beside its buffer and both sides' fields kept between blocks. Whatever happens to the
cache in between (trims, copies, states, prefill chunks, drafts), every update must return
what the general path returns for the same calls."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest

from services.turboquant import (
    TurboQuantConfig,
    TurboQuantKVCache,
    install_patch,
    uninstall_patch,
)
from services.turboquant.cache import join_workspace
from services.turboquant.kernels import fused_decode

from .test_segments import CONFIGS, _kv

STEP_CONFIGS = CONFIGS | {"recommended": TurboQuantConfig.recommended(group_size=32)}
ARRAYS = ("head", "tail", "center")
SAME = ("spec", "dim", "use_rotation", "seed", "body_len")


@pytest.fixture(autouse=True)
def _patched():
    install_patch()


@pytest.fixture(params=[False, True], ids=["portable", "as-on-cuda"])
def on_cuda(request, monkeypatch):
    # as on CUDA: group-major key scales and a join workspace per layer
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: request.param)
    return request.param


def _pair(cfg):
    fast, ref = TurboQuantKVCache(cfg), TurboQuantKVCache(cfg)
    ref.DECODE_FAST_PATH = False
    return fast, ref


def _tail_read(sides) -> list:
    """Both sides' tails as the kernel reads them: a step's new positions (TailAppend) are
    not in the tail yet but in ``append``."""
    append = sides[0].append
    assert sides[1].append is None  # (the key side carries both)
    tails = [None if s.tail is None else np.array(s.tail) for s in sides]
    if append is not None:
        for t, new in zip(tails, (append.k, append.v), strict=True):
            t[:, :, t.shape[2] - new.shape[2] :] = np.array(new)
    return tails


def _assert_same_sides(got, want, cache):
    for a, b, x, y in zip(got, want, _tail_read(got), _tail_read(want), strict=True):
        for name in SAME:
            assert getattr(a, name) == getattr(b, name), name
        assert a.spec is b.spec  # (the decode memo compares specs by identity)
        assert (x is None) == (y is None)
        if x is not None:
            assert a.tail.dtype == b.tail.dtype
            np.testing.assert_array_equal(x, y, err_msg="tail")
        for name in ARRAYS:
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None and name != "tail":
                assert x.shape == y.shape and x.dtype == y.dtype, name
                np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=name)
        assert len(a.parts) == len(b.parts)
        for x, y in zip(a.parts, b.parts, strict=True):
            assert x.shape == y.shape and x.dtype == y.dtype
            np.testing.assert_array_equal(np.array(x), np.array(y))
        assert a.n_body == b.n_body and a.shape == b.shape
    keys, values = got
    assert keys.workspace is join_workspace(cache) and values.workspace is None
    assert (keys.workspace is None) == (want[0].workspace is None)


class _Steps:
    """Feeds both caches the same positions of one long sequence, comparing every update."""

    def __init__(self, cfg, n=700, seed=21):
        self.k, self.v = _kv(n, seed=seed)
        self.fast, self.ref = _pair(cfg)
        self.pos = 0

    def feed(self, n):
        s = slice(self.pos, self.pos + n)
        k, v = self.k[:, :, s], self.v[:, :, s]
        got, want = self.fast.update_and_fetch(k, v), self.ref.update_and_fetch(k, v)
        _assert_same_sides(got, want, self.fast)
        self.pos += n
        assert self.fast.offset == self.ref.offset == self.pos

    def decode(self, steps):
        for _ in range(steps):
            self.feed(1)

    def trim(self, n):
        assert self.fast.trim(n) == self.ref.trim(n)
        self.pos -= n

    def replace(self, make):
        self.fast, self.ref = make(self.fast), make(self.ref)


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_decode_steps_with_trims_return_what_the_general_path_returns(name, on_cuda):
    s = _Steps(STEP_CONFIGS[name])
    s.feed(3)  # (the sinks first)
    s.decode(90)
    s.trim(2)  # the tail only
    s.decode(40)
    s.trim(45)  # into the body
    s.decode(70)
    s.trim(s.pos - 1)  # into the sink
    s.decode(50)


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_prefill_chunks_and_drafts_between_decode_steps(name, on_cuda):
    s = _Steps(STEP_CONFIGS[name])
    s.feed(100)
    s.decode(20)
    s.feed(4)  # a draft: into the tail buffer
    s.feed(40)  # a chunk: concatenated
    s.decode(30)
    s.feed(16)
    s.feed(17)
    s.decode(50)


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_copies_and_states_mid_sequence(name, on_cuda):
    s = _Steps(STEP_CONFIGS[name])
    s.feed(80)
    s.decode(25)
    original = s.fast
    s.replace(copy.deepcopy)
    s.decode(40)
    assert original.offset == 105  # the copy wrote its own buffers
    s.replace(lambda c: TurboQuantKVCache.from_state(c.state, c.meta_state))
    s.decode(40)
    s.replace(copy.deepcopy)
    s.trim(3)
    s.decode(20)


def test_the_fast_path_is_taken(monkeypatch):
    # (else the tests above compare the general path with itself)
    cache = TurboQuantKVCache(TurboQuantConfig.recommended())
    k, v = _kv(300)
    cache.update_and_fetch(k[:, :, :200], v[:, :, :200])  # a block quantized, 71 in the tail
    general, made = [], []
    store, made_views = cache._store, cache._made_views
    monkeypatch.setattr(cache, "_store", lambda *a: general.append(1) or store(*a))
    monkeypatch.setattr(cache, "_made_views", lambda: made.append(1) or made_views())
    for i in range(200, 300):
        cache.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
    # a tail buffer at the first step and after the block quantized at 257; views made
    # anew only then (the prefill's are kept until it)
    assert len(general) == 2 and len(made) == 1


def test_a_step_without_the_patch_still_raises():
    cache = TurboQuantKVCache(TurboQuantConfig.recommended())
    for _ in range(3):
        cache.update_and_fetch(mx.zeros((1, 1, 1, 64)), mx.zeros((1, 1, 1, 64)))
    uninstall_patch()
    with pytest.raises(RuntimeError, match="install_patch"):
        cache.update_and_fetch(mx.zeros((1, 1, 1, 64)), mx.zeros((1, 1, 1, 64)))
