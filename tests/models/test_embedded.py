"""ensure_model / resolve_model / load_model: caching, validation, spec resolution."""

from __future__ import annotations

import json

import pytest

from services.models import embedded
from services.models.embedded import (
    MANIFEST_NAME,
    is_converted,
    load_model,
    read_manifest,
    resolve_model,
)
from services.models.sources import get_spec


def test_resolve_hf_id_unchanged(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert (
        resolve_model("mlx-community/Qwen3-0.6B-4bit", tmp_path) == "mlx-community/Qwen3-0.6B-4bit"
    )


def test_resolve_existing_dir_is_itself(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    assert resolve_model(str(d), tmp_path / "models") == str(d.resolve())


def test_resolve_unknown_embedded_name(tmp_path):
    with pytest.raises(KeyError, match="unknown embedded model"):
        resolve_model("embedded:nope", tmp_path)
    assert not (tmp_path / "nope").exists()


def test_is_converted_rejects_incomplete_dirs(tmp_path):
    spec = get_spec("smollm2-135m-instruct")
    d = tmp_path / spec.name
    assert not is_converted(spec, d)  # absent
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert not is_converted(spec, d)  # no manifest: a crash mid-conversion
    manifest = {
        "name": spec.name,
        "source_sha256": spec.gguf_sha256,
        "converter_version": embedded.CONVERTER_VERSION,
        "files": {"config.json": 2},
    }
    (d / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert is_converted(spec, d)
    (d / "config.json").write_text("{ }")  # size differs from the manifest
    assert not is_converted(spec, d)
    (d / MANIFEST_NAME).write_text(json.dumps({**manifest, "source_sha256": "x"}))
    assert not is_converted(spec, d)  # converted from another source
    (d / MANIFEST_NAME).write_text("{not json")
    assert read_manifest(d) is None and not is_converted(spec, d)


def test_load_model_rejects_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tmp_path), tmp_path, dtype="int8")


def test_runtime_dtype(tmp_path, monkeypatch):
    import platform

    import mlx.core as mx

    from services.models.embedded import runtime_dtype

    gemma_like = tmp_path / "g"
    gemma_like.mkdir()
    (gemma_like / MANIFEST_NAME).write_text(json.dumps({"gpu_dtype": "bfloat16"}))
    plain = tmp_path / "p"
    plain.mkdir()
    assert runtime_dtype("float16", str(gemma_like)) == "float16"  # explicit always wins
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert runtime_dtype("auto", str(plain)) == "float32"
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert runtime_dtype("auto", str(gemma_like)) == "bfloat16"
    assert runtime_dtype("auto", str(plain)) is None  # keep what is stored
    assert runtime_dtype("auto", "some/hf-id") is None
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert runtime_dtype("auto", str(plain)) is None  # macOS CPU: Accelerate handles fp16
