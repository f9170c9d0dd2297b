"""Tiny random-weight mlx-lm models built from ``ModelArgs`` (no downloads, built in seconds).

Each builder returns a float32 model whose layer layout mirrors the real architecture:
``llama`` (every layer full attention), ``qwen3_next`` and ``qwen3_5`` (Gated DeltaNet
layers with one full-attention layer every ``full_attention_interval``; qwen3_5 keeps its
layers under ``language_model.model``) and ``gemma3_text`` (sliding-window layers with a
global one every ``sliding_window_pattern``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

VOCAB = 256


def _finish(model: nn.Module, seed: int) -> nn.Module:
    # Materialise now: the weights were drawn right after mx.random.seed(seed).
    mx.eval(model.parameters())
    model.eval()
    return model


def tiny_llama(
    *, layers: int = 4, head_dim: int = 64, seed: int = 0, rope_scaling: dict | None = None
) -> nn.Module:
    """A llama with GQA (4 query heads, 2 KV heads); all layers use ``KVCache``.
    ``rope_scaling``: as a checkpoint's config has it (Llama 3.1: type "llama3")."""
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=layers,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=True,
    )
    return _finish(llama.Model(args), seed)


def _qwen_hybrid_text_args(layers: int, interval: int) -> dict:
    return dict(
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=interval,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )


def tiny_qwen3_next(*, layers: int = 4, interval: int = 2, seed: int = 0) -> nn.Module:
    """A dense (no-MoE) qwen3_next: layers ``interval-1, 2*interval-1, ...`` are attention."""
    from mlx_lm.models import qwen3_next

    mx.random.seed(seed)
    kw = _qwen_hybrid_text_args(layers, interval)
    args = qwen3_next.ModelArgs(
        model_type="qwen3_next",
        num_experts=0,
        num_experts_per_tok=0,
        decoder_sparse_step=1,
        shared_expert_intermediate_size=0,
        mlp_only_layers=list(range(layers)),
        moe_intermediate_size=0,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        **kw,
    )
    return _finish(qwen3_next.Model(args), seed)


def tiny_qwen3_5(*, layers: int = 4, interval: int = 4, seed: int = 0) -> nn.Module:
    """A qwen3_5 (Qwen3.5/3.6 layout): 3 Gated DeltaNet layers per full-attention layer."""
    from mlx_lm.models import qwen3_5

    mx.random.seed(seed)
    text = dict(model_type="qwen3_5_text", **_qwen_hybrid_text_args(layers, interval))
    text["rope_parameters"] = {
        "type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
    }
    args = qwen3_5.ModelArgs(model_type="qwen3_5", text_config=text)
    return _finish(qwen3_5.Model(args), seed)


def tiny_gemma3_text(
    *, layers: int = 6, pattern: int = 3, window: int = 16, seed: int = 0
) -> nn.Module:
    """A gemma3_text with sliding-window layers; every ``pattern``-th layer is global."""
    from mlx_lm.models import gemma3_text

    mx.random.seed(seed)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text",
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=VOCAB,
        query_pre_attn_scalar=64,
        sliding_window=window,
        sliding_window_pattern=pattern,
        max_position_embeddings=4096,
    )
    return _finish(gemma3_text.Model(args), seed)


def tiny_gemma2(*, layers: int = 2, seed: int = 0) -> nn.Module:
    """A gemma2: its attention is computed by hand (TurboQuant must refuse it)."""
    from mlx_lm.models import gemma2

    mx.random.seed(seed)
    args = gemma2.ModelArgs(
        model_type="gemma2",
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=128,
        num_attention_heads=4,
        head_dim=32,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        num_key_value_heads=2,
    )
    return _finish(gemma2.Model(args), seed)


BUILDERS = {
    "llama": tiny_llama,
    "qwen3_next": tiny_qwen3_next,
    "qwen3_5": tiny_qwen3_5,
    "gemma3_text": tiny_gemma3_text,
}
