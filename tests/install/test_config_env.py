"""docs/config.env.example stays in sync with Settings; config.env merging keeps user edits."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from services.config import Settings

from .conftest import LIB, TEMPLATE, load_lib

configenv = load_lib("configenv")
SEED_TABLE = [
    "SIDECAR_ENABLED",
    "SIDECAR_MODEL",
    "OLLAMA_MODEL",
    "TQ_KV_BITS",
    "TQ_KV_GROUP_SIZE",
    "TQ_USE_ROTATION",
    "TQ_USE_NORMALIZATION",
    "TQ_BOUNDARY_LAYERS",
    "PROMPT_TOKEN_THRESHOLD",
]


def _norm(v: object) -> object:
    return Path(v).expanduser() if isinstance(v, Path) else v


def test_example_lists_every_settings_key_once_with_a_comment():
    entries = configenv.parse_template(TEMPLATE.read_text())
    keys = [e.key for e in entries]
    assert len(keys) == len(set(keys)), "a key is documented twice"
    assert set(keys) == {f.upper() for f in Settings.model_fields}
    for e in entries:
        assert e.comments and "default:" in e.comments[-1], f"{e.key} lacks a 'default:' comment"
    assert set(SEED_TABLE) <= set(keys)


def test_example_defaults_equal_settings_defaults(monkeypatch):
    for f in Settings.model_fields:
        monkeypatch.delenv(f.upper(), raising=False)
    from_file = Settings(_env_file=str(TEMPLATE))  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    for f in Settings.model_fields:
        assert _norm(getattr(from_file, f)) == _norm(getattr(defaults, f)), f


def test_new_config_has_every_key_and_overrides():
    text, changes = configenv.merge(TEMPLATE.read_text(), None, {"ROUTER_PORT": "9123"})
    values = configenv.read_values(text)
    assert values["ROUTER_PORT"] == "9123"
    assert values["SIDECAR_PORT"] == "8001"
    assert set(values) == {e.key for e in configenv.parse_template(TEMPLATE.read_text())}
    assert changes == ["created with every documented key"]


def test_merge_keeps_user_edits_comments_and_unknown_keys():
    template = TEMPLATE.read_text()
    first, _ = configenv.merge(template, None, {})
    edited = first.replace("TQ_KV_BITS=4", "TQ_KV_BITS=3  # mine")
    edited += "\n# my own note\nMY_EXTRA=1\n"
    merged, changes = configenv.merge(template, edited, {})
    assert merged == edited.rstrip("\n") + "\n"  # byte-for-byte kept
    assert changes == []
    assert configenv.read_values(merged)["TQ_KV_BITS"] == "3"


def test_merge_appends_keys_a_newer_template_knows():
    template = TEMPLATE.read_text()
    old = "\n".join(
        line
        for line in configenv.render_new(template, {}).splitlines()
        if "TQ_QUANTIZER" not in line
    )
    old = old.replace("OLLAMA_MODEL=qwen3.5:35b-a3b-coding-nvfp4", "OLLAMA_MODEL=llama3.2:3b")
    merged, changes = configenv.merge(template, old, {})
    values = configenv.read_values(merged)
    assert values["TQ_QUANTIZER"] == "affine"
    assert values["OLLAMA_MODEL"] == "llama3.2:3b"
    assert any("TQ_QUANTIZER" in c for c in changes)
    # Merging again changes nothing: idempotent.
    again, changes2 = configenv.merge(template, merged, {})
    assert again == merged and changes2 == []


def test_override_replaces_value_in_place_and_quotes_when_needed():
    template = TEMPLATE.read_text()
    first, _ = configenv.merge(template, None, {})
    merged, changes = configenv.merge(template, first, {"SIDECAR_MODEL": "/models/my model"})
    assert merged.count("SIDECAR_MODEL=") == 1
    assert configenv.read_values(merged)["SIDECAR_MODEL"] == "/models/my model"
    assert 'SIDECAR_MODEL="/models/my model"' in merged
    assert len(changes) == 1 and "SIDECAR_MODEL" in changes[0]


def test_cli_merge_from_env_and_get(tmp_path):
    cfg = tmp_path / "sub" / "config.env"
    env = {"PATH": "/usr/bin:/bin", "ROUTER_PORT": "9555", "NOT_A_KEY": "x"}
    cmd = [sys.executable, str(LIB / "configenv.py")]
    r = subprocess.run(
        [*cmd, "merge", "--template", str(TEMPLATE), "--config", str(cfg), "--from-env"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600  # may hold an API key
    assert "NOT_A_KEY" not in cfg.read_text()
    cfg.write_text(cfg.read_text().replace("LOG_LEVEL=INFO", "LOG_LEVEL=DEBUG"))
    # A second run without ROUTER_PORT in the environment keeps both values.
    r = subprocess.run(
        [*cmd, "merge", "--template", str(TEMPLATE), "--config", str(cfg), "--from-env"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0
    get = [*cmd, "get", "--template", str(TEMPLATE), "--config", str(cfg)]
    assert subprocess.check_output([*get, "ROUTER_PORT"], text=True).strip() == "9555"
    assert subprocess.check_output([*get, "LOG_LEVEL"], text=True).strip() == "DEBUG"
    missing = tmp_path / "none.env"
    out = subprocess.check_output(
        [
            sys.executable,
            str(LIB / "configenv.py"),
            "get",
            "--template",
            str(TEMPLATE),
            "--config",
            str(missing),
            "SIDECAR_PORT",
        ],
        text=True,
    )
    assert out.strip() == "8001"
    bad = subprocess.run([*get, "NO_SUCH_KEY"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_settings_read_the_written_file(tmp_path):
    cfg = tmp_path / "config.env"
    text, _ = configenv.merge(
        TEMPLATE.read_text(), None, {"SIDECAR_MODEL": "/m/my model", "TQ_KV_BITS": "3"}
    )
    cfg.write_text(text)
    s = Settings(_env_file=str(cfg))  # type: ignore[call-arg]
    assert s.sidecar_model == "/m/my model"
    assert s.tq_kv_bits == 3
    assert s.tq_kv_key_bits is None and s.key_bits == 3
