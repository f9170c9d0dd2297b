"""launchd and systemd templates render into valid files; SIDECAR_ENABLED=auto decisions."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

from .conftest import LIB, load_lib

render = load_lib("render")
sysinfo = load_lib("sysinfo")
GIB = 1024**3


def _render(template: Path, dst: Path, **values: str) -> subprocess.CompletedProcess:
    args = [f"{k}={v}" for k, v in values.items()]
    return subprocess.run(
        [sys.executable, str(LIB / "render.py"), str(template), str(dst), *args],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("svc", ["router", "sidecar"])
def test_launchd_plist_renders_and_validates(tmp_path, svc):
    home = tmp_path / "a & b <home>"  # characters that must be escaped in XML
    dst = tmp_path / f"com.tqstack-{svc}.plist"
    r = _render(
        REPO / "launchagents" / f"com.tqstack-{svc}.plist.template",
        dst,
        LABEL=f"com.tqstack-{svc}",
        APP_DIR=f"{home}/app",
        TQSTACK_HOME=str(home),
        CONFIG=f"{home}/config.env",
        LOG_DIR="/Users/me/Library/Logs",
        SIDECAR_ENABLED="0",
    )
    assert r.returncode == 0, r.stderr
    if shutil.which("plutil"):
        lint = subprocess.run(["plutil", "-lint", str(dst)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
    plist = plistlib.loads(dst.read_bytes())
    assert plist["Label"] == f"com.tqstack-{svc}"
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"] == ["/bin/bash", f"{home}/app/scripts/tqstack-service.sh", svc]
    assert plist["EnvironmentVariables"]["TQSTACK_HOME"] == str(home)
    if svc == "router":  # the installer's resolved SIDECAR_ENABLED reaches the router
        assert plist["EnvironmentVariables"]["SIDECAR_ENABLED"] == "0"
    assert plist["StandardOutPath"] == f"/Users/me/Library/Logs/tqstack-{svc}.log"
    assert plist["StandardErrorPath"] == f"/Users/me/Library/Logs/tqstack-{svc}.err.log"


@pytest.mark.parametrize("svc", ["router", "sidecar"])
def test_systemd_unit_renders_and_verifies(tmp_path, svc):
    home = tmp_path / "my home"
    dst = tmp_path / f"tqstack-{svc}.service"
    r = _render(
        REPO / "launchagents" / "systemd" / f"tqstack-{svc}.service.template",
        dst,
        UNIT=dst.name,
        APP_DIR=f"{home}/app",
        TQSTACK_HOME=str(home),
        CONFIG=f"{home}/config.env",
        LOG_DIR=f"{home}/logs",
        SIDECAR_ENABLED="0",
    )
    assert r.returncode == 0, r.stderr
    text = dst.read_text()
    assert "@" not in text.replace("@.", "")  # no placeholder left
    assert f'ExecStart=/bin/bash "{home}/app/scripts/tqstack-service.sh" {svc}' in text
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text
    assert ('Environment="SIDECAR_ENABLED=0"' in text) == (svc == "router")
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(dst)], capture_output=True, text=True)
        assert v.returncode == 0, v.stderr
        assert "Unknown" not in v.stderr and "Invalid" not in v.stderr, v.stderr


def test_missing_placeholder_or_broken_plist_is_refused(tmp_path):
    tpl = REPO / "launchagents" / "com.tqstack-router.plist.template"
    r = _render(tpl, tmp_path / "x.plist", LABEL="x")
    assert r.returncode == 1 and "APP_DIR" in r.stderr
    assert not (tmp_path / "x.plist").exists()
    broken = tmp_path / "broken.plist.template"
    broken.write_text("<plist><dict><key>Label</key><string>@LABEL@</dict></plist>")
    r = _render(broken, tmp_path / "broken.plist", LABEL="x")
    assert r.returncode == 1 and not (tmp_path / "broken.plist").exists()


def test_systemd_parse_check_catches_missing_keys():
    with pytest.raises(ValueError, match="ExecStart"):
        render.check_systemd_unit(
            "[Unit]\nDescription=x\n[Service]\nType=simple\n[Install]\nWantedBy=a\n"
        )
    with pytest.raises(ValueError, match="not a section"):
        render.check_systemd_unit("[Unit]\nDescription x\n")


def test_sidecar_auto_decision():
    on, why = sysinfo.sidecar_auto(64 * GIB, 20 * GIB)
    assert on and "32 GB" in why
    assert sysinfo.sidecar_auto(int(31.3 * GIB), 20 * GIB)[
        0
    ]  # "32 GB" Linux: the kernel keeps some
    assert sysinfo.sidecar_auto(16 * GIB, int(0.3 * GIB))[0]  # small model on a small machine
    assert not sysinfo.sidecar_auto(16 * GIB, 18 * GIB)[0]
    assert not sysinfo.sidecar_auto(16 * GIB, None)[0]


def test_model_size_estimates(tmp_path):
    assert sysinfo.model_bytes("mlx-community/Qwen3.5-35B-A3B-4bit") == int(35e9 * 0.5)
    assert sysinfo.model_bytes("mlx-community/Llama-3.2-3B-Instruct") == int(3e9 * 2)
    assert sysinfo.model_bytes("some/model") is None
    d = tmp_path / "smollm2-135m-instruct"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 1000)
    assert sysinfo.model_bytes("embedded:smollm2-135m-instruct", tmp_path) == 1000
    assert sysinfo.model_bytes(str(d)) == 1000
    assert (
        sysinfo.model_bytes("embedded:gemma3-270m", tmp_path)
        == sysinfo.EMBEDDED_SIZES["gemma3-270m"]
    )
    assert sysinfo.ram_bytes() > 0
