"""A hybrid model (Gated DeltaNet + softmax layers, the Qwen3.5 layout) through the real
sidecar: architecture report, TurboQuant only on the softmax layers, and prefix-cache
reuse with caches that cannot be trimmed. The model is a tiny random-weight ``qwen3_5``
built from ``ModelArgs`` with SmolLM2's tokenizer (its answers are noise, but greedy
noise is deterministic, which is all these tests compare)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_process
from tests.sidecar.harness import Sidecar, start_sidecar

pytestmark = [pytest.mark.model, pytest.mark.slow]


def build_tiny_qwen3_5(out: Path, tokenizer_dir: Path) -> Path:
    """Write a 4-layer qwen3_5 (layers 1 and 3 full attention) as an mlx-lm directory."""
    import mlx.core as mx
    from mlx_lm.models import qwen3_5
    from mlx_lm.utils import save_config, save_model

    mx.random.seed(0)
    text = dict(
        model_type="qwen3_5_text",
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        vocab_size=49152,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=2,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    config = {"model_type": "qwen3_5", "text_config": text, "eos_token_id": 2}
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def hybrid(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("hybrid")
    model = build_tiny_qwen3_5(tmp / "tiny-qwen3_5", smollm2_dir)
    # The default cache: what a prompt stores does not depend on how it was chunked, so a
    # reused cache equals a fresh one (this random model's near-flat logits would flip on
    # any difference).
    sc = start_sidecar(model, tmp, TQ_KV_BITS="4")
    try:
        yield sc
    finally:
        stop_process(sc.proc)


def ask(sc: Sidecar, messages: list[dict], **kw):
    return sc.client().chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=6, **kw
    )


def test_health_reports_hybrid_and_compresses_softmax_layers_only(hybrid: Sidecar) -> None:
    h = hybrid.health()
    assert h["architecture"] == "hybrid"
    assert h["compressed_layers"] == [1, 3]
    assert h["num_layers"] == 4
    assert h["context_length"] == 4096
    assert h["cache"]["turboquant"] is True and h["cache"]["key_bits"] == 4


def test_same_prompt_again_reuses_all_but_one_token(hybrid: Sidecar) -> None:
    msgs = [{"role": "user", "content": "Name three colours."}]
    first = ask(hybrid, msgs)
    again = ask(hybrid, msgs)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_next_turn_reuses_the_previous_prompt_with_the_same_answer(hybrid: Sidecar) -> None:
    turn1 = [{"role": "user", "content": "Tell me about the sea."}]
    first = ask(hybrid, turn1)
    turn2 = turn1 + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And rivers?"},
    ]
    reused = ask(hybrid, turn2)
    fresh = ask(hybrid, turn2, extra_body={"cache_prompt": False})
    assert reused.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert reused.choices[0].message.content == fresh.choices[0].message.content
