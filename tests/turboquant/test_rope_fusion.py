"""A decode step's RoPE left to the CUDA layer kernel (rope_fusion). On any machine: the cache
as on CUDA (a join workspace) and, for the layer kernel, MLX ops doing what the kernel does
-- the rope from its RopeSpec at the position the kernel counts (sink + body + tail - 1).
The kernel's own rotation is checked on the GPU (bench/attention_gpu.py, check run 12)."""

from __future__ import annotations

import copy
import pickle

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import Llama3RoPE

from services.hybrid_cache import make_turboquant_cache
from services.turboquant import TurboQuantConfig, rope_fusion
from services.turboquant.attention import attend_segments, set_layer_decode_kernel
from services.turboquant.kernels import fused_decode, mma_decode
from services.turboquant.rope_fusion import (
    DeferringRope,
    PendingRope,
    defer_rope,
    follows_pattern,
    restore_rope,
    rope_spec,
)
from services.turboquant.rotation import rotate
from tests.turboquant.tiny_models import tiny_llama, tiny_qwen3_next

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)  # fmt: skip


def spec_rope(x: mx.array, spec, pos: int) -> mx.array:
    """RoPE of ``x`` at ``pos`` from a RopeSpec alone (angles in float64), as the kernel does."""
    d = spec.dims
    th = mx.array((pos * np.array(spec.inv_freq, dtype=np.float64)).astype(np.float32))
    c, s = mx.cos(th), mx.sin(th)
    xf = x.astype(mx.float32)
    if spec.traditional:
        a, b = xf[..., 0:d:2], xf[..., 1:d:2]
        r = mx.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(*x.shape[:-1], d)
    else:
        a, b = xf[..., : d // 2], xf[..., d // 2 : d]
        r = mx.concatenate([a * c - b * s, a * s + b * c], axis=-1)
    return mx.concatenate([r, xf[..., d:]], axis=-1).astype(x.dtype)


@pytest.mark.parametrize(
    "rope",
    [
        nn.RoPE(64),
        nn.RoPE(32, traditional=True, base=500.0, scale=0.5),
        nn.RoPE(16),
        Llama3RoPE(64, 131072, False, 500000.0, LLAMA3),
    ],  # fmt: skip
    ids=["plain", "traditional-scaled", "partial", "llama3"],
)
def test_the_spec_reproduces_the_rope_far_into_a_context(rope):
    x = mx.random.normal((1, 2, 1, 64))
    spec = rope_spec(rope)
    for pos in (0, 300, 40000):
        want = np.array(rope(x, offset=pos))
        got = np.array(spec_rope(x, spec, pos))
        # (float32 angles: ~pos * 2^-23 radians apart at worst)
        np.testing.assert_allclose(got, want, atol=1e-5 + pos * 2e-7 * 8)
    assert rope_spec(object()) is None


def test_only_layers_that_follow_mlx_lms_pattern_are_wrapped():
    from mlx_lm.models import gemma3_text, llama, qwen3_next

    assert follows_pattern(llama.Attention) and follows_pattern(qwen3_next.Qwen3NextAttention)
    assert follows_pattern(gemma3_text.Attention)

    class ScalesItsQuery(nn.Module):  # the query is read again after its rope: not wrapped
        def __call__(self, x, mask=None, cache=None):
            queries, keys, values = x, x, x
            queries = self.rope(queries, offset=cache.offset)
            keys = self.rope(keys, offset=cache.offset)
            keys, values = cache.update_and_fetch(keys, values)
            queries = queries * 2
            return scaled_dot_product_attention(queries, keys, values)  # noqa: F821

    assert not follows_pattern(ScalesItsQuery)
    model = tiny_qwen3_next()
    n = defer_rope(model)
    assert n == sum(isinstance(getattr(m, "rope", None), DeferringRope) for m in model.modules())
    assert n == 2 and defer_rope(model) == 2  # (idempotent)
    assert restore_rope(model) == 2 and defer_rope(model) == 2
    assert not model.parameters().keys() - tiny_qwen3_next().parameters().keys()


@pytest.fixture
def on_cuda(monkeypatch):
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)
    yield
    set_layer_decode_kernel(None)


def _kernel_in_mlx(shift: int, seen: list):
    """A layer kernel that takes a PendingRope as the CUDA one does, in MLX ops: the rope
    from the spec at the context's last position (+ ``shift``), the new key written with it
    (the cache writes it: no writer), the portable attention."""

    def kernel(queries, keys, values, scale, sinks=None):
        append = keys.append
        n_tail = keys.tail_buf[1] if keys.tail_buf is not None else keys.tail.shape[2]
        last = keys.head.shape[2] + keys.n_body + n_tail - 1
        spec = mma_decode._rope_taken(queries, keys, append, last)
        seen.append(spec is not None)
        if spec is None:
            return None
        q = spec_rope(queries.x, spec, last + shift)
        append.k = spec_rope(append.k.x, spec, last + shift)
        k, v = append.written(keys, values)
        return attend_segments(q, rotate(q, keys.rotation), k, v, scale, None, sinks)

    kernel.takes_rope = True
    return kernel


def _logits(build, kernel, steps=24):
    model = build()
    set_layer_decode_kernel(kernel)
    cache = make_turboquant_cache(model, TurboQuantConfig.recommended(group_size=64))
    prompt = mx.random.randint(0, 256, (1, 300), key=mx.random.key(1))
    logits = model(prompt, cache=cache)[:, -1]
    out = [logits]
    for _ in range(steps):
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache=cache)[:, -1]
        out.append(logits)
    set_layer_decode_kernel(None)
    return np.array(mx.stack(out))


@pytest.mark.parametrize(
    "build",
    [lambda: tiny_llama(rope_scaling=LLAMA3), tiny_qwen3_next],
    ids=["llama3-rope", "qwen3_next-partial-rope"],
)
def test_a_deferred_rope_gives_the_logits_of_mlx_ops_and_a_wrong_position_does_not(on_cuda, build):
    want = _logits(build, None)  # (no layer kernel: MLX's rope, the portable path)
    seen = []
    got = _logits(build, _kernel_in_mlx(0, seen))
    # every step but those that quantize a block (no deferred write there) took the rope
    assert sum(seen) > 0.8 * len(seen)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 3e-4, rel  # (CPU ~1e-6; an H200's MLX ops 1.4e-4: bench/gpu_notes.md, session 19)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    off = _logits(build, _kernel_in_mlx(1, []))  # one position off: the test can fail
    assert np.abs(off - want).max() / np.abs(want).max() > 30 * max(rel, 1e-6)


def test_a_declined_rope_is_rotated_by_mlx_and_a_stale_note_is_ignored(on_cuda):
    """The kernel declining (None) leaves queries and the new key to MLX's rope, with the
    same logits; a KV cache's offset after our cache's was read gets the plain rope."""
    build = tiny_llama
    want = _logits(build, None, steps=8)

    pending = []

    def declines(queries, keys, values, scale, sinks=None):
        pending.append(isinstance(queries, PendingRope))
        return None

    declines.takes_rope = True
    got = _logits(build, declines, steps=8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sum(pending) > 0.5 * len(pending)

    model = tiny_llama()
    set_layer_decode_kernel(declines)
    cache = make_turboquant_cache(model, TurboQuantConfig.recommended(group_size=64))
    model(mx.random.randint(0, 256, (1, 300)), cache=cache)
    wrapped = model.model.layers[0].self_attn.rope
    kv = KVCache()
    kv.update_and_fetch(mx.zeros((1, 2, 300, 64)), mx.zeros((1, 2, 300, 64)))
    assert cache[0].offset == kv.offset == 300  # (equal, but another int object)
    out = wrapped(mx.zeros((1, 4, 1, 64)), offset=kv.offset)
    assert isinstance(out, mx.array)


def test_the_offset_stays_a_plain_int_through_copies(on_cuda):
    model = tiny_llama()
    cache = make_turboquant_cache(model, TurboQuantConfig.recommended(group_size=64))
    model(mx.random.randint(0, 256, (1, 300)), cache=cache)
    c = cache[0]
    assert type(c.offset) is int and pickle.loads(pickle.dumps(c.offset)) == 300
    twin = copy.deepcopy(c)
    assert twin.offset == 300 and twin._rope_step is None
    assert mx.arange(c.offset, c.offset + 2).tolist() == [300, 301]  # (MLX takes it)
    assert rope_fusion.SMALL_INTS < 300


def test_tq_fuse_rope_turns_the_wrappers_off(on_cuda):
    """TQ_FUSE_ROPE (default 1): with it off, making a cache for the model leaves (or puts
    back) the model's own ropes, and decoding runs MLX's rope."""
    from services.config import Settings
    from services.turboquant.patch import ensure_patched

    assert Settings().tq_fuse_rope and not Settings(tq_fuse_rope=False).tq_fuse_rope
    model = tiny_llama()
    set_layer_decode_kernel(_kernel_in_mlx(0, []))
    try:
        ensure_patched(model)
        assert isinstance(model.model.layers[0].self_attn.rope, DeferringRope)
        rope_fusion.set_enabled(False)
        ensure_patched(model)
        assert not any(isinstance(getattr(m, "rope", None), DeferringRope)
                       for m in model.modules())  # fmt: skip
    finally:
        rope_fusion.set_enabled(True)
