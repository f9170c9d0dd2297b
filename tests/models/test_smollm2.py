"""The real SmolLM2-135M-Instruct converted from the PyPI wheel (marked ``model``)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from services.models.embedded import (
    MANIFEST_NAME,
    ensure_model,
    is_converted,
    load_model,
    resolve_model,
)
from services.models.sources import extract_gguf, find_wheel, get_spec

pytestmark = pytest.mark.model
NAME = "smollm2-135m-instruct"


def _private_models_dir(tmp_path: Path, models_dir: Path) -> Path:
    """A fresh models dir that reuses the session's downloaded wheel (no network)."""
    spec = get_spec(NAME)
    dl = tmp_path / "models" / "_downloads"
    dl.mkdir(parents=True)
    for dist, version in spec.packages:
        wheel = find_wheel(models_dir / "_downloads", dist, version)
        assert wheel is not None
        os.link(wheel, dl / wheel.name)
    return tmp_path / "models"


def test_config_matches_gguf_metadata(smollm2_dir, models_dir, tmp_path):
    from gguf import GGUFReader

    from services.models.gguf_convert import read_metadata

    spec = get_spec(NAME)
    wheels = {d: find_wheel(models_dir / "_downloads", d, v) for d, v in spec.packages}
    info = read_metadata(GGUFReader(str(extract_gguf(spec, wheels, tmp_path))))
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == info.get("llama.block_count") == 30
    assert cfg["num_key_value_heads"] == info.get("llama.attention.head_count_kv") == 3
    assert cfg["num_attention_heads"] == info.get("llama.attention.head_count") == 9
    assert cfg["hidden_size"] == info.get("llama.embedding_length") == 576
    assert cfg["intermediate_size"] == info.get("llama.feed_forward_length") == 1536
    assert cfg["head_dim"] == info.get("llama.rope.dimension_count") == 64
    assert cfg["vocab_size"] == info.get("llama.vocab_size") == 49152
    assert cfg["rope_theta"] == info.get("llama.rope.freq_base") == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["tie_word_embeddings"] is True
    manifest = json.loads((smollm2_dir / MANIFEST_NAME).read_text())
    assert manifest["source_sha256"] == spec.gguf_sha256 and manifest["dtype"] == "float16"


def test_chat_answer_proves_the_unpermutation(smollm2_dir, models_dir):
    """Wrong q/k row order still gives fluent text, but not the right answer."""
    import mlx.core as mx
    from mlx_lm import generate

    model, tok = load_model(f"embedded:{NAME}", models_dir, dtype="float32")
    assert model.model.embed_tokens.weight.dtype == mx.float32
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    text = generate(model, tok, prompt, max_tokens=24)
    assert "Paris" in text, text


def test_auto_dtype_is_float32_on_linux_cpu(smollm2_dir, models_dir):
    import platform

    import mlx.core as mx

    if mx.default_device() != mx.cpu or platform.system() == "Darwin":
        pytest.skip("auto means float32 only on Linux CPU")
    model, _ = load_model(str(smollm2_dir), models_dir)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32


def test_second_call_does_not_reconvert(smollm2_dir, models_dir):
    manifest_before = (smollm2_dir / MANIFEST_NAME).read_bytes()
    weights_mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    assert ensure_model(NAME, models_dir, progress=False) == smollm2_dir
    assert resolve_model(f"embedded:{NAME}", models_dir) == str(smollm2_dir)
    assert time.monotonic() - started < 1.0
    assert (smollm2_dir / MANIFEST_NAME).read_bytes() == manifest_before
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_corrupted_or_partial_dir_is_redone(models_dir, smollm2_dir, tmp_path):
    from mlx_lm import load

    root = _private_models_dir(tmp_path, models_dir)
    spec = get_spec(NAME)
    # A leftover of a crashed conversion: files but no manifest.
    partial = root / NAME
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    stale_tmp = root / f".{NAME}.tmp-killed"  # the temp dir of a conversion killed with -9
    (stale_tmp / "model").mkdir(parents=True)
    path = ensure_model(NAME, root, progress=False)
    assert path == partial and is_converted(spec, path)
    first = json.loads((path / MANIFEST_NAME).read_text())

    # A truncated weights file (disk full, killed copy).
    weights = path / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert not is_converted(spec, path)
    assert ensure_model(NAME, root, progress=False) == path
    assert weights.stat().st_size == first["files"]["model.safetensors"]
    assert is_converted(spec, path)
    load(str(path))  # mlx-lm reads the redone directory
    # Nothing left behind: no temporary or moved-aside directories.
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(f".{NAME}.") and p.is_dir()]
    assert leftovers == []
    shutil.rmtree(root)


def test_concurrent_callers_convert_once(models_dir, smollm2_dir, tmp_path, monkeypatch):
    """Test suites of several services share one models dir: the lock makes one convert."""
    import threading

    from services.models import embedded

    root = _private_models_dir(tmp_path, models_dir)
    calls = []
    real_convert = embedded.convert_gguf

    def counting_convert(*args, **kwargs):
        calls.append(threading.get_ident())
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(embedded, "convert_gguf", counting_convert)
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_model(NAME, root, progress=False))
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and results == [root / NAME] * 3
    assert len(calls) == 1
    shutil.rmtree(root)
