"""Start the real sidecar process for tests (``python -m services.sidecar`` on a free port)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import PYTHON, REPO, free_port, stop_process

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
MAX_QUEUE = 1  # waiting requests beyond the running one
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class Sidecar:
    """A running sidecar: its base URL, process, and what /health said while starting."""

    def __init__(
        self, url: str, proc: subprocess.Popen, startup: list[tuple[int, dict]], log: Path
    ) -> None:
        self.url, self.proc, self.startup, self.log = url, proc, startup, log

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw
        )

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()


def sidecar_env(model_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
            "TQSTACK_CONFIG": str(REPO / ".cache" / "no-config.env"),  # ignore a user config.env
            "SIDECAR_MODEL": str(model_dir),
            "SIDECAR_HOST": "127.0.0.1",
            "SIDECAR_PORT": str(port),
            "SIDECAR_MAX_QUEUE": str(MAX_QUEUE),
            "SIDECAR_KEEPALIVE_S": "0.2",
            "LOG_LEVEL": "INFO",
            # TurboQuant on with its default settings: what users run.
            "TQ_ENABLED": "1",
        }
    )
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    env.update(extra)
    return env


def start_sidecar(model_dir: Path, tmp: Path, **extra: str) -> Sidecar:
    """Start ``python -m services.sidecar``; record /health answers until it is ready."""
    port = free_port()
    log = tmp / f"sidecar-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [PYTHON, "-m", "services.sidecar"],
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=sidecar_env(model_dir, port, **extra),
        )
    url = f"http://127.0.0.1:{port}"
    seen: list[tuple[int, dict]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            seen.append((r.status_code, r.json()))
            if r.status_code == 503 and len(seen) == 1:
                # A request while loading: refused with an OpenAI error, not queued or hung.
                c = httpx.post(url + "/v1/chat/completions", json={"messages": FRANCE}, timeout=5)
                seen.append(
                    (c.status_code, {"chat": c.json(), "retry": c.headers.get("retry-after")})
                )
            if r.status_code == 200:
                return Sidecar(url, proc, seen, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_process(proc)
    raise TimeoutError(f"sidecar not ready: {log.read_text()[-3000:]}")
