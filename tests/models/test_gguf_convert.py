"""Unit tests of the GGUF -> mlx-lm converter's pure parts (no model files)."""

from __future__ import annotations

import numpy as np
import pytest

from services.models.gguf_convert import (
    GGUFConversionError,
    GGUFInfo,
    build_config,
    hf_tensor_name,
    unpermute_rope_rows,
)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's convert_hf_to_gguf.py applies to q/k (its forward op)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("n_head,head_dim,cols", [(9, 64, 576), (3, 64, 576), (4, 8, 5)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, head_dim, cols):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)  # the permutation really moves rows
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_head), w)


def test_unpermute_layout_per_head():
    # One head of dim 4: HF rows [r0 r1 | r2 r3] (halves) become llama.cpp [r0 r2 r1 r3].
    hf = np.arange(4, dtype=np.float32)[:, None]
    gguf = np.array([0, 2, 1, 3], dtype=np.float32)[:, None]
    np.testing.assert_array_equal(llama_cpp_permute(hf, 1), gguf)
    np.testing.assert_array_equal(unpermute_rope_rows(gguf, 1), hf)


def test_unpermute_rejects_bad_shape():
    with pytest.raises(GGUFConversionError):
        unpermute_rope_rows(np.zeros((6, 2), np.float32), 4)


@pytest.mark.parametrize(
    "gguf_name,arch,hf_name",
    [
        ("token_embd.weight", "llama", "model.embed_tokens.weight"),
        ("output_norm.weight", "llama", "model.norm.weight"),
        ("output.weight", "llama", "lm_head.weight"),
        ("blk.0.attn_q.weight", "llama", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.29.ffn_norm.weight", "llama", "model.layers.29.post_attention_layernorm.weight"),
        ("blk.3.ffn_down.weight", "llama", "model.layers.3.mlp.down_proj.weight"),
        ("blk.1.ffn_norm.weight", "gemma3", "model.layers.1.pre_feedforward_layernorm.weight"),
        (
            "blk.1.post_ffw_norm.weight",
            "gemma3",
            "model.layers.1.post_feedforward_layernorm.weight",
        ),
        (
            "blk.1.post_attention_norm.weight",
            "gemma3",
            "model.layers.1.post_attention_layernorm.weight",
        ),
        ("blk.2.attn_k_norm.weight", "gemma3", "model.layers.2.self_attn.k_norm.weight"),
    ],
)
def test_tensor_names(gguf_name, arch, hf_name):
    assert hf_tensor_name(gguf_name, arch) == hf_name


def test_unknown_tensor_is_an_error():
    with pytest.raises(GGUFConversionError, match="blk.0.attn_qkv"):
        hf_tensor_name("blk.0.attn_qkv.weight", "llama")


def _llama_info(**extra):
    fields = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.context_length": 1024,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 50000.0,
        "llama.attention.layer_norm_rms_epsilon": 9.999999747378752e-06,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        **extra,
    }
    return GGUFInfo("llama", fields)


def test_llama_config_from_metadata():
    cfg = build_config(_llama_info(), vocab_size=100, tied=True, dtype="float16")
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        2,
        4,
        2,
    )
    assert cfg["head_dim"] == 16  # embedding / heads when rope.dimension_count is absent
    assert cfg["rope_theta"] == 50000.0
    assert cfg["rms_norm_eps"] == 1e-05
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 100
    assert cfg["eos_token_id"] == 2 and cfg["bos_token_id"] == 1


def test_gemma3_config_from_metadata():
    fields = {
        "general.architecture": "gemma3",
        "gemma3.block_count": 18,
        "gemma3.context_length": 32768,
        "gemma3.embedding_length": 640,
        "gemma3.feed_forward_length": 2048,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.sliding_window": 512,
        "gemma3.rope.freq_base": 1000000.0,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.eos_token_id": 1,
    }
    cfg = build_config(GGUFInfo("gemma3", fields), vocab_size=262144, tied=True, dtype="float16")
    assert cfg["model_type"] == "gemma3_text"
    assert cfg["sliding_window"] == 512 and cfg["sliding_window_pattern"] == 6
    assert cfg["rope_local_base_freq"] == 10000.0 and cfg["rope_theta"] == 1e6
    assert cfg["query_pre_attn_scalar"] == 256
    assert cfg["eos_token_id"] == [1, 106]


def test_unsupported_architecture():
    with pytest.raises(GGUFConversionError, match="not supported"):
        build_config(GGUFInfo("mamba", {}), vocab_size=1, tied=True, dtype="float16")
