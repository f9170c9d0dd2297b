"""Detached service management on a fake install: start, supervise, restart, stop, uninstall."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest

from tests.conftest import wait_http

from .conftest import our_processes, run_bash


def _health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()


def _port_open(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(120)
def test_load_supervises_and_unload_leaves_nothing(fake_install):
    inst = fake_install
    # A stray ROUTER_PORT in the caller's environment must not reach the detached services:
    # config.env alone decides, as it does for launchd and systemd.
    r = run_bash(inst.script("load-services.sh"), env=inst.env(ROUTER_PORT="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    router = wait_http(f"http://127.0.0.1:{inst.router_port}/health", timeout=20).json()
    sidecar = wait_http(f"http://127.0.0.1:{inst.sidecar_port}/health", timeout=20).json()
    assert router["svc"] == "router" and sidecar["svc"] == "sidecar"
    assert router["leaked_env"] is False
    assert router["sidecar_enabled"] == "1" and sidecar["sidecar_enabled"] is None
    assert (inst.home / "run" / "service-mode").read_text().strip() == "detached"
    assert (inst.home / "logs" / "tqstack-router.log").exists()

    # The supervisor restarts a crashed service (what KeepAlive / Restart= do elsewhere).
    os.kill(router["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if _health(inst.router_port)["pid"] != router["pid"]:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    assert _health(inst.router_port)["pid"] != router["pid"]

    # Loading again replaces the services instead of adding a second copy.
    supervisors = {inst.pid("router"), inst.pid("sidecar")}
    r = run_bash(inst.script("load-services.sh"), env=inst.env())
    assert r.returncode == 0, r.stdout + r.stderr
    wait_http(f"http://127.0.0.1:{inst.router_port}/health", timeout=20)
    assert {inst.pid("router"), inst.pid("sidecar")}.isdisjoint(supervisors)
    procs = our_processes(str(inst.home))
    assert len([p for p in procs if "--supervise router" in p]) == 1, procs
    assert len([p for p in procs if "tqstack-sidecar" in p and "--supervise" not in p]) == 1, procs

    r = run_bash(inst.script("unload-services.sh"), env=inst.env())
    assert r.returncode == 0, r.stderr
    assert our_processes(str(inst.home)) == []
    assert not _port_open(inst.router_port) and not _port_open(inst.sidecar_port)
    assert not (inst.home / "run" / "router.pid").exists()


@pytest.mark.timeout(60)
def test_stale_pid_file_never_kills_a_stranger(fake_install):
    inst = fake_install
    (inst.home / "run").mkdir()
    # Our own pid: alive, but not a tqstack service of this install.
    (inst.home / "run" / "router.pid").write_text(str(os.getpid()))
    r = run_bash(inst.script("unload-services.sh"), env=inst.env())
    assert r.returncode == 0, r.stderr
    assert not (inst.home / "run" / "router.pid").exists()


@pytest.mark.timeout(60)
def test_sidecar_disabled_is_not_started(fake_install):
    inst = fake_install
    inst.config.write_text(
        inst.config.read_text().replace("SIDECAR_ENABLED=1", "SIDECAR_ENABLED=0")
    )
    r = run_bash(inst.script("load-services.sh"), env=inst.env())
    assert r.returncode == 0, r.stderr
    assert "sidecar not started" in r.stdout
    router = wait_http(f"http://127.0.0.1:{inst.router_port}/health", timeout=20).json()
    assert inst.pid("sidecar") is None and not _port_open(inst.sidecar_port)
    assert router["sidecar_enabled"] == "0"  # the router is told not to wait for it


@pytest.mark.timeout(90)
def test_uninstall_keeps_config_and_models_unless_purge(fake_install):
    inst = fake_install
    (inst.home / "models" / "m").mkdir()
    r = run_bash(inst.script("load-services.sh"), env=inst.env())
    assert r.returncode == 0, r.stderr
    wait_http(f"http://127.0.0.1:{inst.router_port}/health", timeout=20)

    r = run_bash(inst.home / "app" / "uninstall.sh", env=inst.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert our_processes(str(inst.home)) == []
    assert not _port_open(inst.router_port)
    for gone in ("venv", "app", "run"):
        assert not (inst.home / gone).exists(), gone
    assert inst.config.exists() and (inst.home / "models" / "m").is_dir()
    assert "kept" in r.stdout and "Ollama" in r.stdout

    # uninstall.sh from the checkout (the installed copy is gone now) with --purge.
    from tests.conftest import REPO

    r = run_bash(REPO / "uninstall.sh", "--purge", env=inst.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert not inst.home.exists()


def test_uninstall_refuses_home_dir(tmp_path):
    from tests.conftest import REPO

    from .conftest import clean_env

    env = clean_env(HOME=str(tmp_path), TQSTACK_HOME=str(tmp_path))
    r = run_bash(REPO / "uninstall.sh", "--purge", env=env)
    assert r.returncode != 0 and "refusing" in r.stderr


def _fake_tools(tmp_path, *names: str) -> tuple[str, object]:
    """Shims for systemctl/launchctl that record their arguments (no real manager here)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for name in names:
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 0\n')
        shim.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", calls


def _load_systemd(inst, tmp_path):
    """load-services.sh in systemd mode with a stand-in systemctl: (units dir, its calls, env)."""
    path, calls = _fake_tools(tmp_path, "systemctl")
    units = tmp_path / "units"
    env = inst.env(TQSTACK_SERVICE_MODE="systemd", TQSTACK_SYSTEMD_DIR=str(units), PATH=path)
    r = run_bash(inst.script("load-services.sh"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return units, calls, env


@pytest.mark.timeout(60)
def test_systemd_mode_renders_enables_and_removes_units(fake_install, tmp_path):
    inst = fake_install
    units, calls, env = _load_systemd(inst, tmp_path)
    for svc in ("router", "sidecar"):
        unit = (units / f"tqstack-{svc}.service").read_text()
        assert f'ExecStart=/bin/bash "{inst.home}/app/scripts/tqstack-service.sh" {svc}' in unit
        assert f"append:{inst.home}/logs/tqstack-{svc}.log" in unit
    log = calls.read_text()
    assert "systemctl --user daemon-reload" in log
    assert "systemctl --user enable tqstack-router.service" in log
    assert "systemctl --user restart tqstack-sidecar.service" in log
    assert inst.pid("router") is None  # nothing detached in this mode

    r = run_bash(inst.script("unload-services.sh"), env=env)
    assert r.returncode == 0, r.stderr
    assert list(units.iterdir()) == []
    assert "systemctl --user disable --now tqstack-router.service" in calls.read_text()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
@pytest.mark.timeout(60)
def test_systemd_units_pass_systemds_own_parser(fake_install, tmp_path):
    """The rendered units as systemd itself reads them (``systemd-analyze verify``): a key it
    does not know, a value it cannot parse or a relative ExecStart is reported there, where a
    text check of ours would pass it."""
    units, _, _ = _load_systemd(fake_install, tmp_path)
    rendered = sorted(units.glob("*.service"))
    assert [u.name for u in rendered] == ["tqstack-router.service", "tqstack-sidecar.service"]
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, rendered)],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # (non-fatal findings -- unknown keys, unparsable values -- only print)
    assert not [ln for ln in r.stderr.splitlines() if ".service:" in ln], r.stderr


@pytest.mark.timeout(60)
def test_launchd_mode_renders_and_boots_agents(fake_install, tmp_path):
    import plistlib

    inst = fake_install
    path, calls = _fake_tools(tmp_path, "launchctl")
    agents = tmp_path / "LaunchAgents"
    env = inst.env(
        TQSTACK_SERVICE_MODE="launchd",
        TQSTACK_LAUNCHAGENTS_DIR=str(agents),
        HOME=str(tmp_path),
        PATH=path,
    )
    r = run_bash(inst.script("load-launchagents.sh"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for svc in ("router", "sidecar"):
        plist = plistlib.loads((agents / f"com.tqstack-{svc}.plist").read_bytes())
        assert plist["KeepAlive"] is True
        assert plist["StandardOutPath"] == f"{tmp_path}/Library/Logs/tqstack-{svc}.log"
    assert "launchctl bootstrap gui/" in calls.read_text()

    # An agent of another install (not pointing at our home) is left alone.
    other = agents / "com.tqstack-other.plist"
    other.write_text("<plist/>")
    r = run_bash(inst.script("unload-launchagents.sh"), env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in agents.iterdir()) == ["com.tqstack-other.plist"]
    assert "launchctl bootout gui/" in calls.read_text()
