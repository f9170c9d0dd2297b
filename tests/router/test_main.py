"""Start-up: the console entry point's bind check and scripts/run-router.sh."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from services.config import is_loopback
from services.router.__main__ import main
from tests.conftest import REPO, free_port, stop_process, wait_http


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_non_loopback_bind_without_key_is_refused(monkeypatch, capsys) -> None:
    monkeypatch.delenv("TQSTACK_API_KEY", raising=False)
    monkeypatch.setenv("TQSTACK_CONFIG", "/nonexistent/config.env")
    assert main(["--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "TQSTACK_API_KEY" in err and "0.0.0.0" in err


def test_a_missing_httptools_asked_for_is_a_clear_refusal(
    without_httptools, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("TQSTACK_CONFIG", "/nonexistent/config.env")
    monkeypatch.setenv("ROUTER_HTTP", "httptools")
    assert main(["--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "ROUTER_HTTP=httptools" in err and "pip install httptools" in err


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROUTER_", "TQSTACK_"))}
    env.update(TQSTACK_HOME="/nonexistent-tqstack-home", PYTHONPATH=str(REPO), **extra)
    return env


def test_run_router_script_serves_health_with_env_overrides(tmp_path) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    env = _env(ROUTER_PORT=str(port), OLLAMA_URL=dead, SIDECAR_URL=dead, HEALTH_INTERVAL_S="0.2")
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts/run-router.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        r = wait_http(f"http://127.0.0.1:{port}/health", ok=(200, 503), timeout=60, proc=proc)
        body = r.json()
        assert body["backends"]["ollama"]["url"] == dead
        assert body["prompt_token_threshold"] == 6000
        assert (
            httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m", "messages": []}
            ).status_code
            == 400
        )
    finally:
        stop_process(proc)


def test_run_router_script_reads_config_env(tmp_path) -> None:
    port = free_port()
    cfg = tmp_path / "config.env"
    cfg.write_text(
        f"ROUTER_PORT={port}\nPROMPT_TOKEN_THRESHOLD=1234\n"
        "OLLAMA_URL=http://127.0.0.1:9\nSIDECAR_URL=http://127.0.0.1:9\n"
    )
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts/run-router.sh")],
        env=_env(TQSTACK_CONFIG=str(cfg)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        r = wait_http(f"http://127.0.0.1:{port}/health", ok=(200, 503), timeout=60, proc=proc)
        assert (r.json()["prompt_token_threshold"], r.json()["threshold_source"]) == (
            1234,
            "config",
        )
    finally:
        stop_process(proc)
