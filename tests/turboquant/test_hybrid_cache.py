"""Layer selection and KV byte accounting (services/hybrid_cache.py) on tiny random models."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache

from services import hybrid_cache as hc
from tests.turboquant.tiny_models import (
    tiny_gemma3_text,
    tiny_llama,
    tiny_qwen3_5,
    tiny_qwen3_next,
)


def tq_config(**kw):
    from services.turboquant.config import TurboQuantConfig

    base = dict(key_bits=4, value_bits=4, group_size=64, quantizer="affine", boundary_layers=0)
    base.update(kw)
    return TurboQuantConfig(**base)


# --------------------------------------------------------------------------- pure selection


@pytest.mark.parametrize(
    "softmax,n,expected",
    [
        ([0, 1, 2, 3, 4, 5], 0, []),
        ([0, 1, 2, 3, 4, 5], 1, [0, 5]),
        ([0, 1, 2, 3, 4, 5], 2, [0, 1, 4, 5]),
        ([0, 1, 2], 5, [0, 1, 2]),
        ([3, 7, 11, 15], 1, [3, 15]),
        ([3], 1, [3]),
    ],
)
def test_boundary_layers_are_counted_among_softmax_layers(softmax, n, expected):
    assert hc.boundary_layer_indices(softmax, n) == expected


def test_replace_kv_caches_touches_only_plain_kvcache():
    model = tiny_gemma3_text(layers=6, pattern=3)
    seen = []

    def factory(i, boundary):
        seen.append((i, boundary))
        return QuantizedKVCache(bits=8)

    caches = hc.replace_kv_caches(model, factory, boundary_layers=1)
    assert seen == [(2, True), (5, True)]
    assert [type(c) for c in caches] == [
        RotatingKVCache,
        RotatingKVCache,
        QuantizedKVCache,
        RotatingKVCache,
        RotatingKVCache,
        QuantizedKVCache,
    ]


# --------------------------------------------------------------------------- per architecture


def test_llama_every_layer_compressed():
    from services.turboquant.cache import TurboQuantKVCache

    model = tiny_llama(layers=4)
    caches = hc.make_turboquant_cache(model, tq_config())
    assert all(type(c) is TurboQuantKVCache for c in caches)
    report = hc.describe_model(model, tq_config())
    assert report.kind == "pure_sdpa"
    assert report.compressed_layers == [0, 1, 2, 3]
    assert report.sliding_layers == [] and report.state_layers == []


@pytest.mark.parametrize(
    "build,expected_attn,num_layers",
    [
        (lambda: tiny_qwen3_next(layers=4, interval=2), [1, 3], 4),
        (lambda: tiny_qwen3_5(layers=8, interval=4), [3, 7], 8),
    ],
    ids=["qwen3_next", "qwen3_5"],
)
def test_hybrid_only_full_attention_layers_compressed(build, expected_attn, num_layers):
    from services.turboquant.cache import TurboQuantKVCache

    model = build()
    caches = hc.make_turboquant_cache(model, tq_config())
    assert len(caches) == num_layers
    for i, c in enumerate(caches):
        if i in expected_attn:
            assert type(c) is TurboQuantKVCache, i
        else:
            assert type(c) is ArraysCache, i  # Gated DeltaNet state stays as the model made it
    report = hc.describe_model(model, tq_config())
    assert report.kind == "hybrid"
    assert report.compressed_layers == expected_attn
    assert report.state_layers == [i for i in range(num_layers) if i not in expected_attn]


def test_gemma3_sliding_layers_left_alone():
    from services.turboquant.cache import TurboQuantKVCache

    model = tiny_gemma3_text(layers=6, pattern=3, window=16)
    caches = hc.make_turboquant_cache(model, tq_config())
    for i in (0, 1, 3, 4):
        assert type(caches[i]) is RotatingKVCache and caches[i].max_size == 16
    for i in (2, 5):
        assert type(caches[i]) is TurboQuantKVCache
    report = hc.describe_model(model, tq_config())
    assert report.kind == "pure_sdpa"
    assert report.sliding_layers == [0, 1, 3, 4]
    assert report.compressed_layers == [2, 5]


def test_boundary_layers_get_boundary_bits_or_stay_full_precision():
    model = tiny_qwen3_5(layers=12, interval=4)  # softmax layers 3, 7, 11
    cfg = tq_config(key_bits=3, value_bits=3, boundary_layers=1, boundary_bits=8)
    report = hc.describe_model(model, cfg)
    assert report.boundary_layers == [3, 11]
    bits = {lk.index: (lk.key_bits, lk.value_bits) for lk in report.layers if lk.role != "state"}
    assert bits == {3: (8, 8), 7: (3, 3), 11: (8, 8)}

    full = tq_config(key_bits=3, value_bits=3, boundary_layers=1, boundary_bits=16)
    caches = hc.make_turboquant_cache(model, full)
    assert type(caches[3]) is KVCache and type(caches[11]) is KVCache
    assert type(caches[7]).__name__ == "TurboQuantKVCache"
    assert hc.describe_model(model, full).compressed_layers == [7]


# --------------------------------------------------------------------------- byte accounting


def test_describe_model_bytes_by_hand_llama():
    # 4 layers x 2 KV heads x head_dim 64, keys and values.
    model = tiny_llama(layers=4, head_dim=64)
    r = hc.describe_model(model, tq_config(key_bits=4, value_bits=4, group_size=64))
    assert r.kv_bytes_per_token_fp16 == 4 * 2 * (64 + 64) * 2
    # 4-bit affine, group 64: 32 B of codes + fp16 scale and bias per vector.
    per_vec = 64 * 4 // 8 + 2 * 2
    assert r.kv_bytes_per_token_compressed == 4 * 2 * 2 * per_vec
    assert r.compression == pytest.approx(256 / 72 * 2 / 2, rel=1e-9)


def test_describe_model_bytes_by_hand_codebook_k4v3():
    model = tiny_llama(layers=4, head_dim=64)
    r = hc.describe_model(model, tq_config(quantizer="codebook", key_bits=4, value_bits=3))
    # codes + one fp16 norm per vector
    k_vec, v_vec = 64 * 4 // 8 + 2, 64 * 3 // 8 + 2
    assert r.kv_bytes_per_token_compressed == 4 * 2 * (k_vec + v_vec)
    assert r.bits_per_element == pytest.approx(8 * (k_vec + v_vec) / 128)


def test_describe_model_bytes_hybrid_and_sliding():
    q = hc.describe_model(tiny_qwen3_next(layers=4, interval=2), tq_config(group_size=32))
    assert q.kv_bytes_per_token_fp16 == 2 * 2 * (32 + 32) * 2  # 2 attention layers, hd 32
    assert q.kv_bytes_per_token_compressed == 2 * 2 * 2 * (32 * 4 // 8 + 2 * 2)

    g = hc.describe_model(tiny_gemma3_text(layers=6, pattern=3, window=16), tq_config())
    assert g.kv_bytes_per_token_fp16 == 2 * 1 * (64 + 64) * 2
    assert g.sliding_bytes_per_token_fp16 == 4 * 1 * (64 + 64) * 2


def test_kv_memory_table_counts_windows_once_full():
    g = hc.describe_model(tiny_gemma3_text(layers=6, pattern=3, window=16), tq_config())
    rows = hc.kv_memory_table(g, [8, 1000])
    per_sliding = 1 * 128 * 2
    assert rows[0].fp16_bytes == 8 * 512 + 4 * 8 * per_sliding
    assert rows[1].fp16_bytes == 1000 * 512 + 4 * 16 * per_sliding
    assert rows[1].compressed_bytes == 1000 * g.kv_bytes_per_token_compressed + 4 * 16 * per_sliding
    assert rows[1].saved_bytes == 1000 * (512 - g.kv_bytes_per_token_compressed)
    md = hc.kv_memory_markdown(g, [8, 1000])
    assert md.count("\n") == 4 and "| 1,000 |" in md


def test_compressed_bytes_match_a_filled_cache():
    """describe_model's per-token figure equals what our cache really stores per token.

    Measured as a slope between two fills (multiples of the preallocation step), so fixed
    per-layer side data (e.g. a key mean per head) does not count as per-token bytes.
    """
    for cfg in (
        tq_config(key_bits=4, value_bits=4, group_size=64),
        tq_config(key_bits=8, value_bits=3, group_size=32),
        tq_config(quantizer="codebook", key_bits=4, value_bits=3),
        tq_config(quantizer="codebook", key_bits=3, value_bits=3, use_normalization=False),
        tq_config(quantizer="codebook", key_bits=5, value_bits=3),  # K affine-5, V codebook-3
        tq_config(key_bits=6, value_bits=2, group_size=128),
    ):
        model = tiny_llama(layers=2, head_dim=64)
        report = hc.describe_model(model, cfg)
        caches = hc.make_turboquant_cache(model, cfg)
        mems = []
        for _ in range(2):
            model(mx.arange(256)[None] % 256, cache=caches)
            mx.eval([c.state for c in caches])
            mems.append(hc.cache_memory(caches))
        assert mems[1]["fp16_equivalent_bytes"] == 512 * report.kv_bytes_per_token_fp16
        slope = (mems[1]["actual_bytes"] - mems[0]["actual_bytes"]) / 256
        assert slope == report.kv_bytes_per_token_compressed, cfg
        fixed = mems[0]["actual_bytes"] - 256 * slope
        assert 0 <= fixed <= 2 * 2 * 64 * 4 * 2, cfg  # at most a float32 vector per head


def test_cache_memory_on_mlx_caches():
    model = tiny_gemma3_text(layers=3, pattern=3, window=16)  # Rotating, Rotating, KVCache
    caches = hc.replace_kv_caches(model, lambda _i, _b: None)
    model(mx.arange(40)[None], cache=caches)
    mem = hc.cache_memory(caches)
    per_tok_fp16 = 1 * 128 * 2
    assert mem["fp16_equivalent_bytes"] == 40 * per_tok_fp16 + 2 * 16 * per_tok_fp16
    assert mem["actual_bytes"] == sum(c.nbytes for c in caches)

    q = [QuantizedKVCache(group_size=32, bits=4)]
    q[0].update_and_fetch(mx.zeros((1, 2, 10, 64)), mx.zeros((1, 2, 10, 64)))
    assert hc.cache_memory(q)["fp16_equivalent_bytes"] == 10 * 2 * 128 * 2
    assert hc.cache_memory([])["actual_bytes"] == 0


# --------------------------------------------------------------------------- config-only CLI

QWEN35_35B_A3B = {
    "model_type": "qwen3_5_moe",
    "text_config": {
        "model_type": "qwen3_5_moe_text",
        "hidden_size": 2048,
        "num_hidden_layers": 40,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "vocab_size": 248320,
        "num_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "full_attention_interval": 4,
        "linear_num_value_heads": 32,
        "linear_num_key_heads": 16,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "intermediate_size": 512,
    },
}


def test_skeleton_of_a_35b_hybrid_from_config_only(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN35_35B_A3B))
    report = hc.describe_model(hc.model_skeleton(tmp_path), tq_config())
    assert report.kind == "hybrid" and report.num_layers == 40
    assert report.compressed_layers == list(range(3, 40, 4))
    assert report.kv_bytes_per_token_fp16 == 10 * 2 * (256 + 256) * 2

    assert hc.main(["--model", str(tmp_path), "--contexts", "8192,32768", "--bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "hybrid" in out and "| 8,192 | 160 MiB |" in out
    assert "3, 7, 11, 15, 19, 23, 27, 31, 35, 39 (10 of 40)" in out

    assert hc.main(["--model", str(path), "--contexts", "1024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory"][0]["fp16_bytes"] == 1024 * 20480
    assert data["compressed_layers"] == list(range(3, 40, 4))


def test_format_layers():
    assert hc.format_layers([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert hc.format_layers([]) == "none"
