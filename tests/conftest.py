"""Fixtures shared by every test package: free ports, process helpers, the real model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str, *, timeout: float = 60.0, ok=(200,), proc: subprocess.Popen | None = None
) -> httpx.Response:
    """Poll ``url`` until it answers one of ``ok``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code in ok:
                return r
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last!r})")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Directory where converted real models are cached across test runs."""
    d = Path(os.environ.get("TQSTACK_TEST_MODELS_DIR", REPO / ".cache" / "models"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def smollm2_dir(models_dir: Path) -> Path:
    """SmolLM2-135M-Instruct converted from the PyPI package into an mlx-lm directory."""
    from services.models.embedded import ensure_model

    return ensure_model("smollm2-135m-instruct", models_dir)


@pytest.fixture(scope="session")
def gemma3_dir(models_dir: Path) -> Path:
    """Gemma 3 270M (base model) converted from the PyPI packages into an mlx-lm directory."""
    from services.models.embedded import ensure_model

    return ensure_model("gemma3-270m", models_dir)


@pytest.fixture
def python_env() -> Iterator[dict[str, str]]:
    """Environment for child Python processes (the repo importable, unbuffered output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    yield env


PYTHON = sys.executable
