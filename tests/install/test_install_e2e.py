"""The README's first command for real: install.sh into a temp prefix, use it, re-run, uninstall.

Fresh virtualenv (pip may use the local cache), the embedded default model from the shared
test models dir, services as detached processes, free ports and a dead Ollama URL so nothing
collides with a stack that may be running on this machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import REPO, free_port

from .conftest import clean_env, our_processes

pytestmark = [pytest.mark.slow, pytest.mark.model]


def _install(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "install.sh")], env=env, capture_output=True, text=True, timeout=480
    )


def _ask(base: str) -> str:
    client = OpenAI(base_url=f"{base}/v1", api_key="local", max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model="tq:auto",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    return r.choices[0].message.content or ""


def _cleanup(home: Path, env: dict[str, str]) -> None:
    """Stop whatever the test started, even after a failure half way."""
    script = home / "app" / "scripts" / "unload-services.sh"
    if script.exists():
        subprocess.run(["bash", str(script)], env=env, capture_output=True, timeout=60)
    for line in our_processes(str(home)):
        pid = int(line.split()[0])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(900)
def test_install_use_reinstall_uninstall(tmp_path, models_dir):
    home = tmp_path / "tqhome"
    router_port, sidecar_port = free_port(), free_port()
    base = f"http://127.0.0.1:{router_port}"
    env = clean_env(
        TQSTACK_HOME=str(home),
        TQSTACK_SERVICE_MODE="detached",
        TQSTACK_WAIT_S="300",
        ROUTER_PORT=str(router_port),
        SIDECAR_PORT=str(sidecar_port),
        OLLAMA_URL=f"http://127.0.0.1:{free_port()}",  # nobody there: the sidecar serves all
        MODELS_DIR=str(models_dir),
    )
    try:
        t0 = time.monotonic()
        r = _install(env)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        print(f"install: {time.monotonic() - t0:.0f}s")
        assert "tqstack is installed" in r.stdout
        assert f"curl -s {base}/v1/chat/completions" in r.stdout
        assert (home / "venv" / "bin" / "tqstack-router").exists()
        # Non-editable: the package lives in the venv, not in this checkout.
        site = subprocess.check_output(
            [
                str(home / "venv" / "bin" / "python"),
                "-c",
                "import services; print(services.__file__)",
            ],
            text=True,
            cwd=tmp_path,  # not the checkout, whose services/ would shadow the installed one
        )
        assert str(home / "venv") in site

        # curl, as the install tells the user to.
        out = subprocess.run(
            [
                "curl",
                "-s",
                "-i",
                f"{base}/v1/chat/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps(
                    {
                        "model": "tq:auto",
                        "max_tokens": 8,
                        "messages": [{"role": "user", "content": "Say hi"}],
                    }
                ),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        head, _, body = out.partition("\n\n")  # text mode turned \r\n into \n
        assert " 200" in head.splitlines()[0], out
        assert "x-tqstack-backend: sidecar" in head.lower()
        assert json.loads(body)["choices"][0]["message"]["content"]

        # OpenAI SDK: non-stream and stream.
        answer = _ask(base)
        print(f"answer: {answer!r}")
        assert answer.strip()
        client = OpenAI(base_url=f"{base}/v1", api_key="local", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model="tq:auto",
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=12,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 2 and "".join(pieces).strip()

        status = subprocess.run(
            [str(home / "bin" / "tqstack-status")],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        print(status.stdout)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"router   UP     {base}" in status.stdout
        assert "sidecar  UP" in status.stdout and "smollm2" in status.stdout
        assert "services detached" in status.stdout

        # Re-run as an upgrade: a user's edit survives, nothing is duplicated.
        config = home / "config.env"
        edited = config.read_text().replace("SIDECAR_MAX_QUEUE=8", "SIDECAR_MAX_QUEUE=5")
        assert edited != config.read_text()
        config.write_text(edited + "# my note\n")
        before = {s: (home / "run" / f"{s}.pid").read_text() for s in ("router", "sidecar")}
        t0 = time.monotonic()
        r = _install(env)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        print(f"re-install: {time.monotonic() - t0:.0f}s")
        text = config.read_text()
        assert "SIDECAR_MAX_QUEUE=5" in text and "# my note" in text
        keys = [ln.split("=", 1)[0] for ln in text.splitlines() if ln and not ln.startswith("#")]
        assert len(keys) == len(set(keys)), "a key was written twice"
        after = {s: (home / "run" / f"{s}.pid").read_text() for s in ("router", "sidecar")}
        assert all(before[s] != after[s] for s in before), "services were not restarted"
        procs = our_processes(str(home))
        for svc in ("router", "sidecar"):
            assert len([p for p in procs if f"--supervise {svc}" in p]) == 1, procs
            assert len([p for p in procs if p.endswith(f"bin/tqstack-{svc}")]) == 1, procs
        assert _ask(base).strip()

        r = subprocess.run(
            ["bash", str(home / "app" / "uninstall.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert our_processes(str(home)) == []
        for port in (router_port, sidecar_port):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        assert not (home / "venv").exists() and not (home / "app").exists()
        assert config.exists(), "config.env is kept without --purge"
        assert (models_dir / "smollm2-135m-instruct" / "config.json").exists(), "models are kept"
    finally:
        _cleanup(home, env)
