"""TurboQuantKVCache against mlx-lm's cache interface (style of mlx-lm's test_prompt_cache)."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from services.turboquant import (
    TurboQuantConfig,
    TurboQuantKVCache,
    install_patch,
    load_turboquant_cache,
    save_turboquant_cache,
)
from services.turboquant.quantizers import dequantize
from services.turboquant.rotation import get_rotation, rotate, unrotate

CONFIGS = [
    TurboQuantConfig(),
    TurboQuantConfig(quantizer="codebook", key_bits=4, value_bits=3),
    TurboQuantConfig(key_bits=8, value_bits=4, group_size=32, use_normalization=False),
    TurboQuantConfig(quantizer="codebook", key_bits=8, value_bits=2, use_rotation=False),
]


@pytest.fixture(autouse=True)
def _patched():
    install_patch()


def _kv(n, heads=2, dim=64, seed=0):
    mx.random.seed(seed)
    return mx.random.normal((1, heads, n, dim)), mx.random.normal((1, heads, n, dim))


def _decoded(cache, side="keys"):
    """The float vectors the cache stands for (un-rotated), for checking contents."""
    view = cache.update_and_fetch.__self__._views()[0 if side == "keys" else 1]
    x = dequantize(view.parts, view.spec)
    if view.center is not None:
        x = x + view.center
    return unrotate(x, view.rotation) if view.rotation is not None else x


def test_no_bits_attribute():
    # mlx-lm's SDPA sends any cache with `bits` to its own affine path.
    c = TurboQuantKVCache()
    assert not hasattr(c, "bits")
    assert not hasattr(TurboQuantKVCache, "bits")


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c.quantizer}-k{c.key_bits}v{c.value_bits}"
)
def test_update_and_fetch_grows_in_steps_and_stores(cfg):
    c = TurboQuantKVCache(cfg)
    assert c.empty() and c.offset == 0 and c.nbytes == 0 and c.state == []
    k, v = _kv(300)
    kv, vv = c.update_and_fetch(k[:, :, :10], v[:, :, :10])
    assert c.offset == 10 and kv.shape == (1, 2, 10, 64) and vv.shape == (1, 2, 10, 64)
    # a centred cache quantizes once it has the 64 positions its key centre is taken from
    assert (c.keys is None) == cfg.center_keys
    kv, vv = c.update_and_fetch(k[:, :, 10:70], v[:, :, 10:70])
    assert c.keys[0].shape[2] == 256 and c.body_len == 70  # one step allocated
    for i in range(70, 300, 29):
        kv, vv = c.update_and_fetch(k[:, :, i : i + 29], v[:, :, i : i + 29])
    assert c.offset == 300 and c.size() == 300 and kv.shape[2] == 300
    # Grown at offset 244 by one step (mlx-lm's policy: cut to offset, add a step).
    assert c.keys[0].shape[2] == 244 + 256
    # The stored vectors decode back close to what went in (8-bit sides tightly).
    for side, ref, bits in (("keys", k, cfg.key_bits), ("values", v, cfg.value_bits)):
        got = _decoded(c, side)
        rel = float(mx.sum((got - ref) ** 2) / mx.sum(ref * ref))
        assert rel < {8: 1e-4, 4: 0.013, 3: 0.05, 2: 0.2}[bits] * (3 if not cfg.use_rotation else 1)


def test_state_meta_state_from_state_roundtrip():
    for cfg in CONFIGS:
        c = TurboQuantKVCache(cfg)
        k, v = _kv(70)
        c.update_and_fetch(k, v)
        meta = c.meta_state
        assert isinstance(meta, tuple) and all(isinstance(m, str) for m in meta)
        state = c.state
        assert all(isinstance(a, mx.array) for a in state)
        assert state[4].shape[2] == 70  # the body's codes, sliced to offset
        d = TurboQuantKVCache.from_state(state, meta)
        assert d.offset == 70 and d.meta_state == meta
        for a, b in zip(d.state, state, strict=True):
            assert mx.array_equal(a, b)
        # mlx-lm's own convention: from_state(state) alone (class defaults for the rest).
        e = TurboQuantKVCache.from_state(state)
        assert e.offset == 70 and len(e.keys) == len(c.keys)
        # A rebuilt cache keeps working.
        d.update_and_fetch(*_kv(5, seed=1))
        assert d.offset == 75


def test_meta_state_rejects_mismatched_state():
    c = TurboQuantKVCache(TurboQuantConfig(quantizer="codebook"))
    c.update_and_fetch(*_kv(4))
    meta = list(c.meta_state)
    meta[0] = "affine"
    with pytest.raises(ValueError):
        TurboQuantKVCache.from_state(c.state, tuple(meta))


def test_empty_state_roundtrip():
    c = TurboQuantKVCache()
    d = TurboQuantKVCache.from_state(c.state, c.meta_state)
    assert d.empty() and d.offset == 0


def test_trim():
    c = TurboQuantKVCache()
    k, v = _kv(100)
    c.update_and_fetch(k, v)
    assert c.is_trimmable()
    assert c.trim(20) == 20 and c.offset == 80
    assert c.state[4].shape[2] == 80 and c.body_len == 80
    kv, _ = c.update_and_fetch(*_kv(5, seed=2))
    assert c.offset == 85 and kv.shape[2] == 85
    assert c.trim(100) == 85 and c.offset == 0


def test_trim_then_refill_matches_fresh_cache():
    # Overwriting trimmed positions must give exactly what a fresh cache stores.
    k, v = _kv(100)
    a = TurboQuantKVCache()
    a.update_and_fetch(k, v)
    a.trim(15)
    a.update_and_fetch(k[:, :, 85:], v[:, :, 85:])
    b = TurboQuantKVCache()
    b.update_and_fetch(k, v)
    for x, y in zip(a.state, b.state, strict=True):
        assert mx.array_equal(x, y)


def test_deepcopy_is_independent():
    c = TurboQuantKVCache(TurboQuantConfig(quantizer="codebook", key_bits=3))
    c.update_and_fetch(*_kv(20))
    d = copy.deepcopy(c)
    assert d.meta_state == c.meta_state
    d.update_and_fetch(*_kv(3, seed=5))
    assert c.offset == 20 and d.offset == 23
    for x, y in zip(c.state, d.state, strict=True):
        assert mx.array_equal(x, y[:, :, :20])


def test_make_mask_follows_offset():
    c = TurboQuantKVCache()
    assert c.make_mask(1) is None
    assert c.make_mask(5) == "causal"
    c.update_and_fetch(*_kv(7))
    m = c.make_mask(3, return_array=True)
    assert m.shape == (3, 10)
    assert np.array_equal(np.array(m[0]), np.arange(10) <= 7)


def test_nbytes_and_compression():
    k, v = _kv(512, heads=4, dim=128)
    cfg = TurboQuantConfig(quantizer="codebook", key_bits=4, value_bits=3, center_keys=False)
    c = TurboQuantKVCache(cfg)
    c.update_and_fetch(k, v)
    assert c.fp16_nbytes == 512 * 4 * 128 * 2 * 2
    # codebook: b*D/8 bytes + 2 for the norm per vector.
    assert c.used_nbytes == 512 * 4 * ((4 * 128 // 8 + 2) + (3 * 128 // 8 + 2))
    assert c.nbytes == c.used_nbytes  # exactly two whole steps
    assert c.effective_bits() == pytest.approx((4.125 + 3.125) / 2)
    a = TurboQuantKVCache(TurboQuantConfig(key_bits=4, value_bits=4, center_keys=False))
    a.update_and_fetch(k, v)
    ref = QuantizedKVCache(group_size=64, bits=4)
    ref.update_and_fetch(k.astype(mx.float16), v.astype(mx.float16))
    assert a.nbytes == ref.nbytes  # same bytes as mlx-lm's fp16 4-bit cache
    assert a.effective_bits() == pytest.approx(4.5)
    # Key centering adds one float32 vector per KV head.
    centered = TurboQuantKVCache(TurboQuantConfig(key_bits=4, value_bits=4))
    centered.update_and_fetch(k, v)
    assert centered.nbytes == a.nbytes + 4 * 128 * 4


def test_constructor_overrides_and_validation():
    c = TurboQuantKVCache(TurboQuantConfig(), key_bits=8, quantizer="codebook")
    assert (c.key_quantizer, c.value_quantizer) == ("affine", "codebook")
    mixed = TurboQuantKVCache(TurboQuantConfig(quantizer="affine", value_quantizer="codebook"))
    assert (mixed.key_quantizer, mixed.value_quantizer) == ("affine", "codebook")
    mixed.update_and_fetch(*_kv(70))
    assert [len(mixed.keys), len(mixed.values)] == [3, 2]
    back = TurboQuantKVCache.from_state(mixed.state, mixed.meta_state)
    assert back.value_spec(64).quantizer == "codebook" and back.meta_state == mixed.meta_state
    with pytest.raises(TypeError):
        TurboQuantKVCache(bits=4)
    with pytest.raises(ValueError):
        TurboQuantConfig(key_bits=7)
    with pytest.raises(ValueError):
        TurboQuantConfig(quantizer="qjl")
    with pytest.raises(ValueError):
        TurboQuantConfig(value_quantizer="qjl")


def test_from_kv_cache_equals_incremental():
    k, v = _kv(64)
    kv = KVCache()
    kv.update_and_fetch(k, v)
    a = TurboQuantKVCache.from_kv_cache(kv, TurboQuantConfig(quantizer="codebook"))
    b = TurboQuantKVCache(TurboQuantConfig(quantizer="codebook"))
    b.update_and_fetch(k, v)
    assert a.offset == 64
    for x, y in zip(a.state, b.state, strict=True):
        assert mx.array_equal(x, y)


def test_config_from_settings():
    from services.config import load_settings

    s = load_settings(
        tq_kv_bits=3,
        tq_kv_key_bits=4,
        tq_quantizer="codebook",
        tq_use_normalization=False,
        tq_boundary_layers=2,
        tq_rotation_seed=9,
    )
    cfg = TurboQuantConfig.from_settings(s)
    assert (cfg.key_bits, cfg.value_bits, cfg.quantizer) == (4, 3, "codebook")
    assert not cfg.use_normalization and cfg.boundary_layers == 2 and cfg.seed == 9
    # the library's recommended config is the stack's default
    defaults = TurboQuantConfig.from_settings(load_settings(config_path="/nonexistent"))
    assert defaults == TurboQuantConfig.recommended()
    assert defaults.key_quantizer == "channel" and defaults.sink_tokens == 1
    custom = load_settings(tq_key_quantizer="", tq_value_quantizer="codebook", tq_window=32)
    cfg = TurboQuantConfig.from_settings(custom)
    assert (cfg.key_quantizer, cfg.value_quantizer, cfg.window) == (None, "codebook", 32)


def test_save_load_mixed_list(tmp_path):
    k, v = _kv(33)
    ours = TurboQuantKVCache(TurboQuantConfig(quantizer="codebook", key_bits=4, value_bits=2))
    ours.update_and_fetch(k, v)
    aff = TurboQuantKVCache(TurboQuantConfig(key_bits=8, value_bits=3, use_rotation=False))
    aff.update_and_fetch(k, v)
    plain = KVCache()
    plain.update_and_fetch(k, v)
    rot = RotatingKVCache(max_size=16, keep=2)
    rot.update_and_fetch(k, v)
    empty_ours, empty_plain = TurboQuantKVCache(), KVCache()
    caches = [ours, aff, plain, rot, empty_ours, empty_plain]
    path = tmp_path / "cache.safetensors"
    save_turboquant_cache(path, caches, {"model": "tiny", "tokens": "33"})
    loaded, meta = load_turboquant_cache(path, return_metadata=True)
    assert meta == {"model": "tiny", "tokens": "33"}
    assert [type(c) for c in loaded] == [type(c) for c in caches]
    for a, b in zip(loaded[:2], caches[:2], strict=True):
        assert a.meta_state == b.meta_state and a.offset == 33
        for x, y in zip(a.state, b.state, strict=True):
            assert mx.array_equal(x, y)
    assert loaded[2].offset == 33 and mx.array_equal(loaded[2].state[0], plain.state[0])
    assert loaded[3].offset == rot.offset and mx.array_equal(loaded[3].keys, rot.keys)
    assert loaded[4].empty() and loaded[5].empty()
    assert load_turboquant_cache(path)[0].offset == 33


def test_load_rejects_foreign_file(tmp_path):
    p = tmp_path / "x.safetensors"
    mx.save_safetensors(str(p), {"a": mx.zeros((2,))})
    with pytest.raises(ValueError):
        load_turboquant_cache(p)


def test_rotation_matrix_shared_by_seed():
    a = TurboQuantKVCache(TurboQuantConfig(seed=4))
    views = a.update_and_fetch(*_kv(2))
    assert views[0].rotation is get_rotation(64, 4)


def test_key_centering_state_and_first_single_token():
    k, v = _kv(100)
    c = TurboQuantKVCache(TurboQuantConfig(quantizer="codebook"))
    c.update_and_fetch(k, v)
    assert c.key_center.shape == (1, 2, 1, 64)
    assert len(c.state) == 4 + 2 + 2 + 1 and c.meta_state[8] == "1"
    d = TurboQuantKVCache.from_state(c.state, c.meta_state)
    assert mx.array_equal(d.key_center, c.key_center)
    assert TurboQuantKVCache.from_state(c.state).key_center is not None
    c.trim(30)
    c.update_and_fetch(k[:, :, :3], v[:, :, :3])
    assert mx.array_equal(d.key_center, c.key_center)  # fixed once chosen
    # The centre is the mean of the first 64 positions however they were fed (position 0,
    # usually BOS, left out), so a prompt always stores the same bytes.
    one = TurboQuantKVCache(TurboQuantConfig(quantizer="codebook"))
    for i in range(100):
        one.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
    assert mx.array_equal(one.key_center, d.key_center)
    want = mx.mean(rotate(k[:, :, 1:64], get_rotation(64, 0)), axis=2, keepdims=True)
    assert float(mx.abs(one.key_center - want).max()) < 1e-5
    off = TurboQuantKVCache(TurboQuantConfig(center_keys=False))
    off.update_and_fetch(k, v)
    assert off.key_center is None and len(off.state) == 4 + 6 and off.meta_state[8] == "0"


@pytest.mark.parametrize("arch", ["qwen3_5", "gemma3_text"])
def test_saved_hybrid_cache_continues_exactly(tmp_path, arch):
    # Mixed lists (ArraysCache / RotatingKVCache + ours) survive save/load bit for bit.
    from services.turboquant import make_turboquant_cache
    from tests.turboquant.tiny_models import tiny_gemma3_text, tiny_qwen3_5

    model = {"qwen3_5": tiny_qwen3_5, "gemma3_text": tiny_gemma3_text}[arch]()
    cache = make_turboquant_cache(model, TurboQuantConfig(quantizer="codebook", key_bits=3))
    model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8] * 4]), cache=cache)
    path = tmp_path / "hybrid.safetensors"
    save_turboquant_cache(path, cache)
    loaded = load_turboquant_cache(path)
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert any(isinstance(c, TurboQuantKVCache) for c in loaded)
    nxt = mx.array([[9]])
    assert mx.array_equal(model(nxt, cache=cache), model(nxt, cache=loaded))


def test_packed_side_made_is_the_frozen_dataclass_it_stands_for():
    """The cache's fast constructor (two a layer every decode step) sets every field, in the
    dataclass's order, and the result stays frozen."""
    import dataclasses
    import inspect

    from services.turboquant.cache import PackedSide

    names = [f.name for f in dataclasses.fields(PackedSide)]
    assert list(inspect.signature(PackedSide.made).parameters) == names
    values = [object() for _ in names]
    a, b = PackedSide(*values), PackedSide.made(*values)
    assert type(b) is PackedSide and all(getattr(a, n) is getattr(b, n) for n in names)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.tail = None
