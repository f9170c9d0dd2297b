"""Group-major storage of per-channel key scales (what the CUDA kernel reads coalesced)
stores the same cache: every view, state, trim, save/load and attention output equals the
(B, H, D, T/g) storage's, here on the CPU where both are forced."""

from __future__ import annotations

import mlx.core as mx
import pytest

from services.turboquant import (
    TurboQuantConfig,
    TurboQuantKVCache,
    install_patch,
    load_turboquant_cache,
    save_turboquant_cache,
)
from services.turboquant.attention import turboquant_attention
from services.turboquant.kernels import cuda_available

HEADS, DIM, GROUP = 2, 64, 32


@pytest.fixture(autouse=True)
def _patched():
    install_patch()


def _pair(**over):
    cfg = TurboQuantConfig.recommended(group_size=GROUP, **over)
    caches = TurboQuantKVCache(cfg), TurboQuantKVCache(cfg)
    caches[0].KEY_SCALES_GROUP_MAJOR = False  # (instance attributes: the class keeps None)
    caches[1].KEY_SCALES_GROUP_MAJOR = True
    return caches


def _step(caches, k, v, q):
    """Feed both caches; their attention outputs for ``q`` (the portable path here)."""
    outs = []
    for c in caches:
        ks, vs = c.update_and_fetch(k, v)
        outs.append(turboquant_attention(q, ks, vs, DIM**-0.5))
    return outs


def _assert_same(a: TurboQuantKVCache, b: TurboQuantKVCache):
    assert a.meta_state == b.meta_state
    assert len(a.state) == len(b.state)
    for x, y in zip(a.state, b.state, strict=True):
        assert x.shape == y.shape and mx.array_equal(x, y)


def test_group_major_scales_store_and_attend_the_same():
    mx.random.seed(3)
    d_major, g_major = _pair()
    n = 150
    k, v = (mx.random.normal((1, HEADS, 400, DIM)) for _ in range(2))
    q = mx.random.normal((1, 2 * HEADS, 1, DIM))
    a, b = _step((d_major, g_major), k[:, :, :n], v[:, :, :n], q)
    assert mx.array_equal(a, b)
    # stored: D-major (B, H, D, T/g) vs group-major (B, H, T/g, D); handed out alike
    assert d_major.keys[1].shape[-2] == DIM and g_major.keys[1].shape[-1] == DIM
    assert g_major.keys[1].shape[-2] == d_major.keys[1].shape[-1]
    _assert_same(d_major, g_major)
    for i in range(n, 330):  # decode steps: groups spill, the body storage grows past a step
        a, b = _step((d_major, g_major), k[:, :, i : i + 1], v[:, :, i : i + 1], q)
        assert mx.array_equal(a, b), i
    assert g_major.body_len > TurboQuantKVCache.step
    _assert_same(d_major, g_major)
    for c in (d_major, g_major):  # into the body, cutting a group: its kept part comes back
        assert c.trim(45) == 45
    _assert_same(d_major, g_major)
    a, b = _step((d_major, g_major), k[:, :, 300:340], v[:, :, 300:340], q)
    assert mx.array_equal(a, b)
    _assert_same(d_major, g_major)


def test_a_loaded_state_is_laid_out_as_wanted_at_its_next_group(tmp_path):
    mx.random.seed(4)
    d_major, g_major = _pair()
    k, v = (mx.random.normal((1, HEADS, 300, DIM)) for _ in range(2))
    q = mx.random.normal((1, 2 * HEADS, 1, DIM))
    _step((d_major, g_major), k[:, :, :200], v[:, :, :200], q)
    path = tmp_path / "c.safetensors"
    save_turboquant_cache(path, [g_major])  # its state: swapped views of group-major storage
    loaded = load_turboquant_cache(path)[0]
    _assert_same(loaded, d_major)
    from_state = TurboQuantKVCache.from_state(g_major.state, g_major.meta_state)
    for c in (loaded, from_state):
        c.KEY_SCALES_GROUP_MAJOR = True
        assert c.keys[1].shape[-2] == DIM  # as loaded: (B, H, D, T/g)
    for i in range(200, 300):
        outs = _step((d_major, loaded, from_state), k[:, :, i : i + 1], v[:, :, i : i + 1], q)
        assert all(mx.array_equal(outs[0], o) for o in outs[1:]), i
    for c in (loaded, from_state):
        assert c.keys[1].shape[-1] == DIM  # re-laid at the first group it quantized
        _assert_same(c, d_major)


def test_default_layout_follows_the_cuda_kernels():
    mx.random.seed(5)
    c = TurboQuantKVCache(TurboQuantConfig.recommended(group_size=GROUP))
    assert c.KEY_SCALES_GROUP_MAJOR is None
    c.update_and_fetch(*(mx.random.normal((1, HEADS, 100, DIM)) for _ in range(2)))
    grouped = c.keys[1].shape[-1] == DIM
    assert grouped == cuda_available()
    # per-vector keys have no channel scales: the setting changes nothing there
    plain = TurboQuantKVCache(TurboQuantConfig())
    plain.KEY_SCALES_GROUP_MAJOR = True
    ref = TurboQuantKVCache(TurboQuantConfig())
    kv = [mx.random.normal((1, HEADS, 70, DIM)) for _ in range(2)]
    for x in (plain, ref):
        x.update_and_fetch(*kv)
    _assert_same(plain, ref)
