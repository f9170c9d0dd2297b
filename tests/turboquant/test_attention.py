"""Attention through the packed cache vs float32 SDPA: algebra exact, error bounded per bits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from services.turboquant import TurboQuantConfig, TurboQuantKVCache, install_patch
from services.turboquant import attention as attn
from services.turboquant.quantizers import dequantize
from services.turboquant.rotation import unrotate

from .decoded import decoded


@pytest.fixture(autouse=True)
def _patched():
    install_patch()


def _data(n_q=8, n_kv=2, L=1, T=200, D=64, seed=0, B=1):
    mx.random.seed(seed)
    q = mx.random.normal((B, n_q, L, D))
    # Keys with a few outlier channels (what real models have and rotation is for).
    k = mx.random.normal((B, n_kv, T, D)) * mx.where(mx.arange(D) % 17 == 0, 6.0, 1.0)
    v = mx.random.normal((B, n_kv, T, D))
    return q, k, v


def _fill(cfg, k, v, chunks=(0.6, 0.3)):
    """A cache filled in several update_and_fetch calls; returns the cache and last views."""
    c = TurboQuantKVCache(cfg)
    T = k.shape[2]
    cuts = [0, *(int(T * f) for f in np.cumsum(chunks)), T]
    views = None
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if b > a:
            views = c.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
    return c, views


def _dequantized(view):
    return decoded(view)


def _ref(q, k, v, mask=None, sinks=None):
    return mx.fast.scaled_dot_product_attention(
        q, k, v, scale=q.shape[-1] ** -0.5, mask=mask, sinks=sinks
    )


def _rel(a, b):
    return float(mx.sqrt(mx.sum((a - b) ** 2) / mx.sum(b * b)))


CONFIGS = {
    "affine-k8v8": TurboQuantConfig(key_bits=8, value_bits=8),
    "affine-k4v4": TurboQuantConfig(key_bits=4, value_bits=4),
    "affine-k4v3-g32": TurboQuantConfig(key_bits=4, value_bits=3, group_size=32),
    "affine-k3v3-nonorm": TurboQuantConfig(key_bits=3, value_bits=3, use_normalization=False),
    "codebook-k4v4": TurboQuantConfig(quantizer="codebook", key_bits=4, value_bits=4),
    "codebook-k3v3": TurboQuantConfig(quantizer="codebook", key_bits=3, value_bits=3),
    "codebook-k4v2": TurboQuantConfig(quantizer="codebook", key_bits=4, value_bits=2),
    "codebook-k8v4": TurboQuantConfig(quantizer="codebook", key_bits=8, value_bits=4),
    "norotation-k4v4": TurboQuantConfig(key_bits=4, value_bits=4, use_rotation=False),
}

# Max relative L2 error of the attention output vs float32 SDPA on the unquantized data
# (keys with outlier channels make the softmax sharp: a hard case). ~1.3x the largest value
# measured over 6 seeds; the algebra itself is checked to 2e-4 against the dequantized math.
BOUNDS = {
    "affine-k8v8": 0.015,
    "affine-k4v4": 0.2,
    "affine-k4v3-g32": 0.27,
    "affine-k3v3-nonorm": 0.4,
    "codebook-k4v4": 0.27,
    "codebook-k3v3": 0.5,
    "codebook-k4v2": 0.53,
    "codebook-k8v4": 0.14,
    "norotation-k4v4": 0.45,
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("L", [1, 7, 40])
def test_matches_dequantized_math_and_bounded_vs_fp32(name, L):
    q, k, v = _data(L=L, seed=L)
    cache, (kv, vv) = _fill(CONFIGS[name], k, v)
    mask = "causal" if L > 1 else None
    out = attn.turboquant_attention(q, kv, vv, scale=64**-0.5, mask=mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    # 1) The packed path computes exactly attention over the vectors the cache stands for.
    exact = _ref(q, _dequantized(kv), _dequantized(vv), mask=mask)
    assert _rel(out, exact) < 2e-4
    # 2) ... and that is close to attention over the original vectors.
    assert _rel(out, _ref(q, k, v, mask=mask)) < BOUNDS[name]


def test_fewer_bits_more_error():
    q, k, v = _data(seed=3)
    ref = _ref(q, k, v)
    errs = []
    for bits in (8, 4, 3, 2):
        _, (kv, vv) = _fill(TurboQuantConfig(key_bits=bits, value_bits=bits), k, v)
        errs.append(_rel(attn.turboquant_attention(q, kv, vv, scale=0.125), ref))
    assert errs == sorted(errs) and errs[0] < 0.015 and errs[-1] > 0.1


def test_rotation_reduces_error_with_outlier_channels():
    q, k, v = _data(seed=4, T=400)
    ref = _ref(q, k, v)
    out = {}
    for rot in (True, False):
        cfg = TurboQuantConfig(key_bits=3, value_bits=3, use_rotation=rot)
        _, (kv, vv) = _fill(cfg, k, v)
        out[rot] = _rel(attn.turboquant_attention(q, kv, vv, scale=0.125), ref)
    assert out[True] < out[False]


def test_key_centering_is_exact_for_attention():
    # Softmax ignores a per-query constant: attention over the stored (centered) keys equals
    # attention over the same keys with the center added back.
    q, k, v = _data(L=3, T=150, seed=12)  # the centre is taken over the first 64 positions
    cfg = TurboQuantConfig(quantizer="codebook", key_bits=3, value_bits=4)
    _, (kv, vv) = _fill(cfg, k, v)
    assert kv.center is not None and float(mx.abs(kv.center).max()) > 0.1
    out = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal")
    k_back = unrotate(dequantize(kv.parts, kv.spec) + kv.center, kv.rotation)
    assert _rel(out, _ref(q, k_back, _dequantized(vv), mask="causal")) < 2e-4
    # And centering does not cost accuracy (8 bits: both within rounding of the truth).
    for center in (True, False):
        cfg = TurboQuantConfig(key_bits=8, value_bits=8, center_keys=center)
        _, (kv, vv) = _fill(cfg, k, v)
        assert (kv.center is not None) == center
        got = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal")
        assert _rel(got, _ref(q, k, v, mask="causal")) < 0.015


@pytest.mark.parametrize("quantizer", ["affine", "codebook"])
def test_masks(quantizer):
    q, k, v = _data(L=5, T=40, seed=5)
    cfg = TurboQuantConfig(quantizer=quantizer, key_bits=4, value_bits=4)
    _, (kv, vv) = _fill(cfg, k, v)
    kd, vd = _dequantized(kv), _dequantized(vv)
    # "causal": the 5 queries are the last 5 positions of 40.
    causal = mx.arange(35, 40)[:, None] >= mx.arange(40)[None]
    a = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal")
    assert _rel(a, _ref(q, kd, vd, mask=causal)) < 2e-4
    # A boolean array mask (batch, 1, L, T) and the equivalent additive mask.
    rnd = mx.random.uniform(shape=(1, 1, 5, 40)) > 0.3
    rnd[..., 0] = True
    b = attn.turboquant_attention(q, kv, vv, scale=0.125, mask=rnd)
    assert _rel(b, _ref(q, kd, vd, mask=rnd)) < 2e-4
    add = mx.where(rnd, 0.0, -1e9)
    c = attn.turboquant_attention(q, kv, vv, scale=0.125, mask=add)
    assert _rel(c, b) < 1e-5
    assert _rel(a, b) > 1e-2  # the masks really mattered


def test_sinks():
    q, k, v = _data(L=1, T=30, seed=6)
    _, (kv, vv) = _fill(TurboQuantConfig(key_bits=8, value_bits=8), k, v)
    sinks = mx.linspace(-1.0, 3.0, 8)
    out = attn.turboquant_attention(q, kv, vv, scale=0.125, sinks=sinks)
    exact = _ref(q, _dequantized(kv), _dequantized(vv), sinks=sinks)
    assert _rel(out, exact) < 2e-4
    assert _rel(out, attn.turboquant_attention(q, kv, vv, scale=0.125)) > 1e-2


def test_no_gqa_and_batch():
    q, k, v = _data(n_q=2, n_kv=2, L=3, B=2, seed=7)
    _, (kv, vv) = _fill(TurboQuantConfig(quantizer="codebook"), k, v)
    out = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal")
    exact = _ref(q, _dequantized(kv), _dequantized(vv), mask="causal")
    assert out.shape == (2, 2, 3, 64) and _rel(out, exact) < 2e-4


def test_caller_queries_not_mutated_and_dtype_kept():
    q, k, v = _data(seed=8)
    q16 = q.astype(mx.float16)
    before = np.array(q16)
    _, (kv, vv) = _fill(TurboQuantConfig(), k.astype(mx.float16), v.astype(mx.float16))
    out = attn.turboquant_attention(q16, kv, vv, scale=0.125)
    mx.eval(out)
    assert out.dtype == mx.float16
    np.testing.assert_array_equal(np.array(q16), before)


def test_codebook_blocks_equal_single_block(monkeypatch):
    q, k, v = _data(L=2, T=100, seed=9)
    _, (kv, vv) = _fill(TurboQuantConfig(quantizer="codebook", key_bits=3), k, v)
    whole = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal")
    monkeypatch.setattr(attn, "CONTEXT_BLOCK", 16)  # 7 blocks, the last one partial
    tiled = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal")
    assert _rel(tiled, whole) < 1e-5


@pytest.mark.parametrize("quantizer", ["affine", "codebook"])
def test_dense_prefill_path_equals_quantized_path(monkeypatch, quantizer):
    # Long query chunks use dequantize-a-tile + dense matmul; few queries use
    # quantized_matmul (affine). Both compute the same attention.
    q, k, v = _data(L=40, T=300, seed=13)
    cfg = TurboQuantConfig(quantizer=quantizer, key_bits=3, value_bits=4)
    _, (kv, vv) = _fill(cfg, k, v)
    monkeypatch.setattr(attn, "CONTEXT_BLOCK", 128)
    dense = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal")
    monkeypatch.setattr(attn, "DENSE_PREFILL_MIN_QUERIES", 10_000)
    quant = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal")
    assert _rel(dense, quant) < 1e-5


@pytest.mark.parametrize(
    "cfg",
    [
        dict(key_quantizer="channel", group_size=64, sink_tokens=1),  # the default's layout
        dict(sink_tokens=2, window=16),  # per-vector keys with a centre, sink and tail
        dict(quantizer="codebook", key_bits=3),
    ],
    ids=["channel-sink", "affine-sink-tail-centre", "codebook"],
)
def test_prefill_tiles_equal_one_tile_with_segments_and_sinks(monkeypatch, cfg):
    # The online softmax over tiles of the body must give what one tile gives, joined
    # with the full-precision sink and tail, with learned sinks and a causal chunk.
    q, k, v = _data(L=40, T=300, seed=21)
    _, (kv, vv) = _fill(TurboQuantConfig(**cfg), k, v)
    assert kv.n_body > 128
    sinks = mx.array(np.random.default_rng(3).standard_normal(8).astype(np.float32))
    monkeypatch.setattr(attn, "CONTEXT_BLOCK", 4096)
    whole = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal", sinks=sinks)
    monkeypatch.setattr(attn, "CONTEXT_BLOCK", 64)  # several tiles, the last one partial
    tiled = attn.turboquant_attention(q, kv, vv, scale=0.125, mask="causal", sinks=sinks)
    assert _rel(tiled, whole) < 1e-5


@pytest.mark.parametrize(
    "cfg", [TurboQuantConfig(), TurboQuantConfig.recommended()], ids=["plain", "default"]
)
def test_prefill_memory_is_bounded_by_the_chunk_not_the_context(cfg):
    extra = {}
    for total in (4096, 16384):
        cache = TurboQuantKVCache(cfg)
        k = mx.random.normal((1, 2, total, 64)).astype(mx.float16)
        v = mx.random.normal((1, 2, total, 64)).astype(mx.float16)
        kv, vv = cache.update_and_fetch(k, v)
        q = mx.random.normal((1, 8, 256, 64))  # a 256-token chunk at the end of the context
        mx.eval(q, *kv.parts, *vv.parts, kv.tail, vv.tail)
        del k, v
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(attn.turboquant_attention(q, kv, vv, 0.125, "causal"))
        extra[total] = mx.get_peak_memory() - base
    full_scores_16k = 8 * 256 * 16384 * 4  # what the L x T score matrix alone would take
    assert extra[16384] < 1.5 * extra[4096], extra
    assert extra[16384] < full_scores_16k / 3, extra


def test_decode_kernel_hook():
    q, k, v = _data(seed=10)
    _, (kv, vv) = _fill(TurboQuantConfig(), k, v)
    portable = attn.turboquant_attention(q, kv, vv, scale=0.125)
    calls = []

    def declining(q_rot, keys, values, scale, mask, sinks):
        calls.append((q_rot.shape, keys.spec.quantizer, scale))
        return None

    def constant(q_rot, keys, values, scale, mask, sinks):
        return mx.zeros(q_rot.shape, dtype=mx.float32)

    old = attn.set_decode_kernel(declining)
    try:
        assert _rel(attn.turboquant_attention(q, kv, vv, scale=0.125), portable) < 1e-6
        assert calls == [((1, 8, 1, 64), "affine", 0.125)]
        attn.set_decode_kernel(constant)
        assert float(mx.abs(attn.turboquant_attention(q, kv, vv, scale=0.125)).max()) == 0.0
        # Prefill (L > 1) never goes to the decode kernel.
        q7 = mx.random.normal((1, 8, 7, 64))
        assert float(mx.abs(attn.turboquant_attention(q7, kv, vv, 0.125, "causal")).max()) > 0
    finally:
        attn.set_decode_kernel(old)


def test_decode_calls_count_the_path_that_answered():
    """/health's decode counters: a layer kernel that answers counts as ``kernel``, one that
    declines leaves the call to MLX ops (``portable``); prefill is not a decode call."""
    from services.turboquant import TurboQuantConfig, TurboQuantKVCache, install_patch
    from services.turboquant.attention import (
        decode_calls,
        decode_path,
        set_layer_decode_kernel,
        turboquant_attention,
    )

    install_patch()
    cache = TurboQuantKVCache(TurboQuantConfig.recommended())
    k = mx.random.normal((1, 2, 300, 64)).astype(mx.float16)
    keys, values = cache.update_and_fetch(k, k)
    q = mx.random.normal((1, 4, 1, 64)).astype(mx.float16)
    answers = []

    def kernel(queries, keys, values, scale, sinks):
        return answers.pop() if answers else None  # declines when out of answers

    old = set_layer_decode_kernel(kernel)
    try:
        assert decode_path() == "cuda-kernel"
        start = decode_calls()
        answers.append(mx.zeros(q.shape, dtype=q.dtype))
        turboquant_attention(q, keys, values, 0.1)  # answered by the kernel
        turboquant_attention(q, keys, values, 0.1)  # declined: MLX ops
        turboquant_attention(mx.zeros((1, 4, 5, 64)), keys, values, 0.1, mask="causal")
        end = decode_calls()
    finally:
        set_layer_decode_kernel(old)
    assert end["kernel"] - start["kernel"] == 1
    assert end["portable"] - start["portable"] == 1
    if old is None:
        assert decode_path() == "portable"
