"""The real Gemma 3 270M (base) converted from the PyPI packages (marked ``model``)."""

from __future__ import annotations

import json

import pytest

from services.models.embedded import MANIFEST_NAME, load_model
from services.models.sources import get_spec

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gemma(gemma3_dir, models_dir):
    return load_model("embedded:gemma3-270m", models_dir, dtype="float32")


def test_config_for_mlx_lm(gemma3_dir):
    cfg = json.loads((gemma3_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (
        18,
        640,
        2048,
    )
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 256)
    assert cfg["vocab_size"] == 262144
    assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 1e4
    assert cfg["sliding_window"] == 512 and cfg["sliding_window_pattern"] == 6
    assert 1 in cfg["eos_token_id"] and 106 in cfg["eos_token_id"]
    manifest = json.loads((gemma3_dir / MANIFEST_NAME).read_text())
    assert manifest["source_sha256"] == get_spec("gemma3-270m").gguf_sha256
    assert manifest["gpu_dtype"] == "bfloat16"


def test_sliding_window_caches(gemma):
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    model, _ = gemma
    cache = make_prompt_cache(model)
    assert len(cache) == 18
    global_layers = [i for i, c in enumerate(cache) if type(c) is KVCache]
    assert global_layers == [5, 11, 17]
    sliding = [c for i, c in enumerate(cache) if i not in global_layers]
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 512 for c in sliding)


def test_completes_plausibly(gemma):
    import mlx.core as mx
    from mlx_lm import generate

    model, tok = gemma
    assert tok.encode("The capital of France is")[0] == tok.bos_token_id == 2
    logits = model(mx.array([tok.encode("The capital of France is")]))[0, -1]
    top5 = [tok.decode([t]) for t in mx.argsort(-logits)[:5].tolist()]
    assert " Paris" in top5, top5
    text = generate(model, tok, "The Eiffel Tower is located in the city of", max_tokens=8)
    assert text.startswith(" Paris"), text


def test_plain_text_template_for_a_base_model(gemma):
    _, tok = gemma
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    # No role markers the base model never saw: the messages as plain text after <bos>.
    assert prompt == "<bos>Be brief.\n\nHello"


@pytest.mark.parametrize("city", ["Berlin", "Tokyo"])
def test_long_prompt_past_the_window(gemma, city):
    """A fact 700 tokens back (past the 512-token window): only global layers can see it."""
    from mlx_lm import generate

    model, tok = gemma
    filler = "The weather was mild and the streets were quiet that day. " * 60
    prompt = f"My friend Alice lives in {city}. " + filler + "Alice lives in the city of"
    assert len(tok.encode(prompt)) > 700
    text = generate(model, tok, prompt, max_tokens=4)
    assert text.startswith(f" {city}"), text
