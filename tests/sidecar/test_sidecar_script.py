"""scripts/run-sidecar.sh starts the sidecar in the foreground with the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port, stop_process, wait_http

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_run_sidecar_script_serves_the_embedded_default(smollm2_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIDECAR_", "TQ_", "TQSTACK_", "LD_PRELOAD"))
    }
    # No config names a model: the embedded default, found already converted in MODELS_DIR.
    env.update({"TQSTACK_HOME": str(tmp_path), "MODELS_DIR": str(smollm2_dir.parent)})
    (tmp_path / "config.env").write_text(f"SIDECAR_PORT={port}\n")
    log = tmp_path / "sidecar.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "run-sidecar.sh")],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        h = wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc).json()
        assert h["model"] == "smollm2-135m-instruct" and h["status"] == "ok"
        environ = Path(f"/proc/{proc.pid}/environ")
        if environ.exists() and Path("/usr/lib/x86_64-linux-gnu/openblas-pthread").exists():
            # exec'd in place: the script's process is the server, with OpenBLAS preloaded.
            assert b"libopenblas" in environ.read_bytes()
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            timeout=60,
            json={"prompt": "Hello", "max_tokens": 1},
        )
        assert r.status_code == 200
    finally:
        stop_process(proc)
    assert proc.returncode in (0, -15), log.read_text()[-2000:]


def test_a_model_that_cannot_load_ends_the_process(tmp_path: Path) -> None:
    port = free_port()
    broken = tmp_path / "broken-model"
    broken.mkdir()  # a directory without config.json or weights
    env = dict(
        os.environ,
        TQSTACK_HOME=str(tmp_path),
        SIDECAR_PORT=str(port),
        SIDECAR_MODEL=str(broken),
        PYTHONPATH=str(REPO),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "services.sidecar"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "model failed to load" in proc.stderr
