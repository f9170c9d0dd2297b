"""The cache's full-precision head (attention sinks) and tail (recent window), and keys
quantized per channel over groups of positions: layout, exact attention, trim, state."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest

from services.turboquant import (
    TurboQuantConfig,
    TurboQuantKVCache,
    install_patch,
    load_turboquant_cache,
    save_turboquant_cache,
)
from services.turboquant.attention import turboquant_attention

from .decoded import decoded

CHANNEL = TurboQuantConfig(
    quantizer="codebook", key_quantizer="channel", group_size=32, sink_tokens=2
)
WINDOWED = TurboQuantConfig(quantizer="codebook", sink_tokens=1, window=16)
CONFIGS = {
    "channel-k4v4-s2": CHANNEL,
    "channel-k3v3-w8": TurboQuantConfig(
        quantizer="codebook",
        key_quantizer="channel",
        key_bits=3,
        value_bits=3,
        group_size=64,
        window=8,
    ),
    "codebook-s1-w16": WINDOWED,
    "affine-k4v4-s4-w5-centred": TurboQuantConfig(sink_tokens=4, window=5),
}


@pytest.fixture(autouse=True)
def _patched():
    install_patch()


def _kv(n, heads=2, dim=64, seed=0, dtype=mx.float32):
    mx.random.seed(seed)
    k = mx.random.normal((1, heads, n, dim))
    # a few outlier channels, as real keys have
    k = k * mx.where(mx.arange(dim) % 16 == 3, 8.0, 1.0)
    return k.astype(dtype), mx.random.normal((1, heads, n, dim)).astype(dtype)


def _fill(cfg, k, v, chunks):
    c = TurboQuantKVCache(cfg)
    start = 0
    for n in chunks:
        out = c.update_and_fetch(k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
    return c, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_segments_hold_sink_body_and_tail_in_order(name):
    cfg = CONFIGS[name]
    k, v = _kv(300)
    c, (kv, vv) = _fill(cfg, k, v, [1, 7, 64, 3, 100, 1, 1, 123])
    assert c.offset == 300 and kv.shape == (1, 2, 300, 64) and vv.shape[2] == 300
    block = cfg.group_size if cfg.key_quantizer == "channel" else 1
    assert kv.head.shape[2] == cfg.sink_tokens
    assert cfg.window <= kv.tail.shape[2] < cfg.window + block
    assert kv.n_body % block == 0 and kv.n_body == vv.n_body
    assert kv.head.shape[2] + kv.n_body + kv.tail.shape[2] == 300
    # head and tail are the inputs themselves; the body decodes close to them
    np.testing.assert_array_equal(np.array(kv.head), np.array(k[:, :, : cfg.sink_tokens]))
    np.testing.assert_array_equal(np.array(vv.tail), np.array(v[:, :, 300 - vv.tail.shape[2] :]))
    for side, ref, bits in ((kv, k, cfg.key_bits), (vv, v, cfg.value_bits)):
        got = decoded(side)
        rel = float(mx.sum((got - ref) ** 2) / mx.sum(ref * ref))
        assert rel < {4: 0.013, 3: 0.05}[bits], rel


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stored_state_does_not_depend_on_chunking(name):
    # What a prompt stores must not depend on how it was fed: prefix reuse stays exact.
    cfg = CONFIGS[name]
    k, v = _kv(260, seed=3)
    a, _ = _fill(cfg, k, v, [260])
    b, _ = _fill(cfg, k, v, [5, 90, 1, 1, 64, 99])
    assert a.meta_state == b.meta_state
    for x, y in zip(a.state, b.state, strict=True):
        np.testing.assert_array_equal(np.array(x), np.array(y))


def _reference(q, keys, values, scale, mask):
    """mx.fast SDPA over the decoded sequence: what our attention must equal."""
    return mx.fast.scaled_dot_product_attention(
        q, decoded(keys), decoded(values), scale=scale, mask=mask
    )


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_q_heads", [2, 6])
@pytest.mark.parametrize("L", [1, 5, 40])
def test_attention_equals_sdpa_over_decoded_segments(name, n_q_heads, L):
    cfg = CONFIGS[name]
    k, v = _kv(200 + L, seed=4)
    c, _ = _fill(cfg, k, v, [77, 123])
    keys, values = c.update_and_fetch(k[:, :, 200:], v[:, :, 200:])
    mx.random.seed(9)
    q = mx.random.normal((1, n_q_heads, L, 64))
    mask = "causal" if L > 1 else None
    got = turboquant_attention(q, keys, values, 0.125, mask=mask)
    want = _reference(q, keys, values, 0.125, mask)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-4, atol=2e-4)


def test_attention_with_learned_sinks_matches_reference():
    k, v = _kv(150, seed=5)
    c, (keys, values) = _fill(CHANNEL, k, v, [150])
    q = mx.random.normal((1, 4, 1, 64))
    sinks = mx.array([0.5, -1.0, 2.0, 0.0])
    got = turboquant_attention(q, keys, values, 0.125, sinks=sinks)
    want = mx.fast.scaled_dot_product_attention(
        q, decoded(keys), decoded(values), scale=0.125, mask=None, sinks=sinks
    )
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("cut", [3, 40, 150, 299])
def test_trim_then_refill(name, cut):
    cfg = CONFIGS[name]
    k, v = _kv(300, seed=6)
    c, (k_before, v_before) = _fill(cfg, k, v, [200, 100])
    decoded_k = decoded(k_before)
    assert c.trim(cut) == cut and c.offset == 300 - cut
    # what is left stands for the same vectors as before the trim
    kv, vv = c._views()
    kept = 300 - cut
    np.testing.assert_allclose(
        np.array(decoded(kv)), np.array(decoded_k[:, :, :kept]), rtol=1e-3, atol=1e-3
    )
    if cfg.key_quantizer == "channel":
        assert kv.n_body % cfg.group_size == 0
    # refilling continues the sequence with the usual layout
    kv, vv = c.update_and_fetch(k[:, :, kept:], v[:, :, kept:])
    assert c.offset == 300 and kv.shape[2] == 300
    assert kv.head.shape[2] + kv.n_body + kv.tail.shape[2] == 300
    assert c.trim(1000) == 300 and c.offset == 0 and c.head_k.shape[2] == 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_roundtrips_through_from_state_deepcopy_and_file(name, tmp_path):
    cfg = CONFIGS[name]
    k, v = _kv(150, seed=7)
    c, _ = _fill(cfg, k, v, [100, 50])
    q = mx.random.normal((1, 2, 1, 64))
    want = turboquant_attention(q, *c._views(), 0.125)
    rebuilt = [
        TurboQuantKVCache.from_state(c.state, c.meta_state),
        copy.deepcopy(c),
    ]
    path = tmp_path / "cache.safetensors"
    save_turboquant_cache(path, [c])
    rebuilt.append(load_turboquant_cache(path)[0])
    for d in rebuilt:
        assert d.offset == 150 and d.meta_state == c.meta_state
        got = turboquant_attention(q, *d._views(), 0.125)
        np.testing.assert_array_equal(np.array(got), np.array(want))
        d.update_and_fetch(*_kv(40, seed=8))
        assert d.offset == 190
    assert c.offset == 150  # the copies did not share storage with the original


def test_state_and_meta_state_must_agree():
    c, _ = _fill(CHANNEL, *_kv(100), [100])
    meta = list(c.meta_state)
    meta[7] = "99"  # offset
    with pytest.raises(ValueError):
        TurboQuantKVCache.from_state(c.state, tuple(meta))
    meta = list(c.meta_state)
    meta[10] = "affine"  # values were stored by the codebook quantizer
    with pytest.raises(ValueError):
        TurboQuantKVCache.from_state(c.state, tuple(meta))


def test_channel_is_for_keys_only():
    with pytest.raises(ValueError, match="keys only"):
        TurboQuantConfig(value_quantizer="channel")
    with pytest.raises(ValueError, match="keys only"):
        TurboQuantConfig(quantizer="channel")
    with pytest.raises(ValueError):
        TurboQuantKVCache(sink_tokens=-1)


def test_fp16_inputs_keep_their_dtype_in_head_and_tail():
    k, v = _kv(100, dtype=mx.float16)
    c, (kv, vv) = _fill(CHANNEL, k, v, [100])
    assert kv.head.dtype == mx.float16 and vv.tail.dtype == mx.float16
    q = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
    out = turboquant_attention(q, kv, vv, 0.125)
    assert out.dtype == mx.float16 and out.shape == (1, 2, 1, 64)


def test_effective_bits_count_every_stored_byte():
    k, v = _kv(32 * 40 + 2)
    c, _ = _fill(CHANNEL, k, v, [k.shape[2]])
    # body: 4-bit codes + a scale and bias per channel per 32 positions (keys), 4-bit
    # codes + a norm per vector (values); head 2 positions float32 (the input dtype)
    body = 32 * 40
    fp = 2 * 2 * 64 * 4 * 2  # head keys + values, 2 heads, float32
    key_bytes = 2 * 64 * (body // 2 + body // 32 * 4)
    value_bytes = 2 * body * (64 // 2 + 2)
    assert c.used_nbytes == fp + key_bytes + value_bytes


def test_the_tail_left_after_quantizing_does_not_pin_the_prefill_chunk():
    from services.turboquant import TurboQuantConfig, TurboQuantKVCache

    cache = TurboQuantKVCache(TurboQuantConfig.recommended())
    shape = (1, 8, 16384 + 100, 128)  # 32 MiB per side in float16; 100 positions stay fp
    k = mx.random.normal(shape).astype(mx.float16)
    v = mx.random.normal(shape).astype(mx.float16)
    mx.eval(k, v)
    k_bytes = k.nbytes
    mx.synchronize()
    base = mx.get_active_memory()
    cache.update_and_fetch(k, v)
    mx.eval(list(cache.state))
    del k, v
    mx.synchronize()
    mx.clear_cache()
    held = mx.get_active_memory() - base + 2 * k_bytes  # the inputs are freed
    assert 0 < cache.tail_k.shape[2] < 128  # some positions stay in full precision
    # The compressed body and fp tail are ~9 MiB; a pinned chunk would add 64 MiB.
    assert held < 24 * 2**20, held / 2**20


def _decode_steps(cfg, k, v, prefill: int, append_max: int, trim_at: int | None = None):
    """Prefill, then one position per step (trimming 5 once at ``trim_at``); returns the
    cache and the attention output of every step."""
    c = TurboQuantKVCache(cfg)
    c.TAIL_APPEND_MAX = append_max
    c.update_and_fetch(k[:, :, :prefill], v[:, :, :prefill])
    outs = []
    for i in range(prefill, k.shape[2]):
        if i == trim_at:
            c.trim(5)
            i -= 5
        kv, vv = c.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        q = k[:, :, i : i + 1] * 0.5
        outs.append(turboquant_attention(q, kv, vv, 0.125))
    return c, outs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_steps_in_the_tail_buffer_equal_the_concatenating_path(name):
    cfg = CONFIGS[name]
    k, v = _kv(230, seed=11)
    c_buf, out_buf = _decode_steps(cfg, k, v, prefill=70, append_max=16, trim_at=150)
    c_cat, out_cat = _decode_steps(cfg, k, v, prefill=70, append_max=0, trim_at=150)
    assert c_buf._tail_buf is not None and c_cat._tail_buf is None
    assert c_buf.offset == c_cat.offset == 225
    for a, b in zip(c_buf.state, c_cat.state, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    for a, b in zip(out_buf, out_cat, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_decode_steps_write_one_buffer_until_the_block_is_quantized():
    cfg = TurboQuantConfig.recommended()  # per-channel keys: blocks of 128 positions
    k, v = _kv(300, seed=12, dtype=mx.float16)
    c = TurboQuantKVCache(cfg)
    c.update_and_fetch(k[:, :, :1], v[:, :, :1])  # the sink position
    bufs = []
    for i in range(1, 300):
        c.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
        bufs.append(c._tail_buf[0])
        assert c._tail_buf[2] is c.tail_k or c.tail_k.shape[2] == 0
    # One buffer per block of 128 steps (quantizing the block starts the next one).
    assert len({id(b) for b in bufs}) == 3
    assert c.body_len == 256 and c.tail_k.shape[2] == 300 - 1 - 256
    # nbytes reports the buffer the tail lives in, not just the view.
    fp = 2 * c.head_k.nbytes + 2 * c._tail_buf[0].nbytes
    assert c._tail_buf[0].shape[2] == 128 + c.TAIL_APPEND_MAX
    assert c.nbytes == sum(p.nbytes for p in (*c.keys, *c.values)) + fp
    np.testing.assert_array_equal(np.array(c.tail_k), np.array(k[:, :, 257:]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_refill_to_the_trimmed_body_length_returns_the_new_body(name):
    # A trim into the body and a refill of as many positions rewrite the body's arrays in
    # place and end at the old length: views kept for that length would show the old body.
    cfg = CONFIGS[name]
    k, v = _kv(300, seed=13)
    new_k, new_v = k[:, :, 250:280], v[:, :, 250:280]
    got, want = TurboQuantKVCache(cfg), TurboQuantKVCache(cfg)
    for c in (got, want):
        c.update_and_fetch(k[:, :, :200], v[:, :, :200])
    body = got.body_len
    for c in (got, want):
        c.trim(30)  # into the body in every config
    want._views()  # (views made at the trimmed length)
    sides = got.update_and_fetch(new_k, new_v)
    assert got.body_len == body  # the case: the same arrays, the same length, new content
    for a, b in zip(sides, want.update_and_fetch(new_k, new_v), strict=True):
        np.testing.assert_array_equal(np.array(decoded(a)), np.array(decoded(b)))
