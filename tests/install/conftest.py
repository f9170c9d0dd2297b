"""Helpers for the install tests: the stdlib helper modules, a fake install, bash runners."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO, free_port

LIB = REPO / "scripts" / "lib"
TEMPLATE = REPO / "docs" / "config.env.example"


def load_lib(name: str) -> ModuleType:
    """Import scripts/lib/<name>.py (stdlib helpers that install.sh runs before any venv)."""
    spec = importlib.util.spec_from_file_location(f"tq_lib_{name}", LIB / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any tqstack setting (so a running stack cannot leak in)."""
    keys = set(load_lib("configenv").read_values(TEMPLATE.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in keys and not k.startswith("TQSTACK_")}
    env.update(extra)
    return env


def run_bash(
    script: Path, *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run one of our bash scripts and capture its output."""
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


# A stand-in for tqstack-router / tqstack-sidecar: serves GET /health on the port config.env
# gives it, and reports whether the settings leaked in from the caller's environment.
FAKE_SERVICE = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    svc = "{svc}"
    values = {{}}
    for line in open(os.environ["TQSTACK_CONFIG"]).read().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            values[k] = v
    key = "ROUTER_PORT" if svc == "router" else "SIDECAR_PORT"
    port = int(os.environ.get(key) or values[key])

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({{"status": "ok", "backends": {{}}, "svc": svc, "pid": os.getpid(),
                               "leaked_env": key in os.environ,
                               "sidecar_enabled": os.environ.get("SIDECAR_ENABLED")}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


class FakeInstall:
    """An install prefix laid out as install.sh makes it, with fake service executables."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.router_port = free_port()
        self.sidecar_port = free_port()
        app = home / "app"
        (app / "docs").mkdir(parents=True)
        shutil.copytree(
            REPO / "scripts", app / "scripts", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copytree(REPO / "launchagents", app / "launchagents")
        shutil.copy(TEMPLATE, app / "docs" / "config.env.example")
        shutil.copy(REPO / "uninstall.sh", app / "uninstall.sh")
        bin_dir = home / "venv" / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "python").symlink_to(sys.executable)
        for svc in ("router", "sidecar"):
            exe = bin_dir / f"tqstack-{svc}"
            exe.write_text(FAKE_SERVICE.format(python=sys.executable, svc=svc))
            exe.chmod(0o755)
        (home / "models").mkdir()
        self.config = home / "config.env"
        configenv = load_lib("configenv")
        text, _ = configenv.merge(
            TEMPLATE.read_text(),
            None,
            {
                "TQSTACK_HOME": str(home),
                "ROUTER_PORT": str(self.router_port),
                "SIDECAR_PORT": str(self.sidecar_port),
                "SIDECAR_ENABLED": "1",
                "OLLAMA_URL": f"http://127.0.0.1:{free_port()}",
            },
        )
        self.config.write_text(text)

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            **{"TQSTACK_HOME": str(self.home), "TQSTACK_SERVICE_MODE": "detached", **extra}
        )

    def script(self, name: str) -> Path:
        return self.home / "app" / "scripts" / name

    def pid(self, svc: str) -> int | None:
        p = self.home / "run" / f"{svc}.pid"
        return int(p.read_text()) if p.exists() else None


def our_processes(needle: str) -> list[str]:
    """Command lines of live processes that mention ``needle`` (a temp path of this test)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if needle in line and "ps -eo" not in line]


@pytest.fixture
def fake_install(tmp_path: Path):
    """A fake install; whatever it started is stopped afterwards, even when a test fails."""
    inst = FakeInstall(tmp_path / "home")
    yield inst
    run_bash(inst.script("unload-services.sh"), env=inst.env(), timeout=60)
