"""tqstack-status against real HTTP servers on loopback that speak the DESIGN.md contracts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

from .conftest import clean_env

# The tqstack-status console script of the venv running these tests (.venv or TQSTACK_TEST_VENV).
STATUS = str(Path(sys.executable).parent / "tqstack-status")

ROUTER_HEALTH = {
    "status": "degraded",
    "backends": {"ollama": {"state": "down"}, "sidecar": {"state": "up"}},
    "sidecar_available": True,
    "sidecar_architecture": "pure_sdpa",
    "prompt_token_threshold": 6000,
    "threshold_source": "auto:pure_sdpa",
    "context_lengths": {"ollama": {"qwen3.5:35b": 262144}, "sidecar": 8192},
}
SIDECAR_HEALTH = {  # the shape services/sidecar/engine.py reports
    "status": "ok",
    "model": "smollm2-135m-instruct",
    "architecture": "pure_sdpa",
    "context_length": 8192,
    "num_layers": 30,
    "compressed_layers": list(range(30)),
    "cache": {
        "type": "turboquant",
        "turboquant": True,
        "key_bits": 4,
        "value_bits": 4,
        "group_size": 64,
        "quantizer": "affine",
        "kv_bytes_per_token_fp16": 23040,
        "kv_bytes_per_token_actual": 6480,
    },
    "active_requests": 1,
    "queued_requests": 0,
    "requests": [{"id": "r1", "kv_actual_bytes": 2**20, "kv_fp16_equivalent_bytes": 4 * 2**20}],
    "memory": {"mlx_active_bytes": 300 * 2**20, "prompt_cache_entries": 2},
}


@contextmanager
def serve(routes: dict[str, tuple[int, object]]) -> Iterator[int]:
    """A loopback HTTP server answering GET path -> (status, JSON body); yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = routes.get(self.path, (404, {"error": "nope"}))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _status(tmp_path: Path, *args: str, **ports: int) -> subprocess.CompletedProcess:
    env = clean_env(TQSTACK_HOME=str(tmp_path), **{k: str(v) for k, v in ports.items()})
    return subprocess.run([STATUS, *args], env=env, capture_output=True, text=True, timeout=60)


def test_everything_up(tmp_path):
    ollama_routes = {
        "/api/version": (200, {"version": "0.19.2"}),
        "/api/ps": (200, {"models": [{"name": "qwen3.5:35b", "size": 22 * 2**30, "size_vram": 0}]}),
    }
    with (
        serve({"/health": (200, ROUTER_HEALTH)}) as rp,
        serve({"/health": (200, SIDECAR_HEALTH)}) as sp,
        serve(ollama_routes) as op,
    ):
        r = _status(tmp_path, ROUTER_PORT=rp, SIDECAR_PORT=sp, OLLAMA_URL=f"http://127.0.0.1:{op}")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"router   UP     http://127.0.0.1:{rp}" in out
    assert "threshold: 6000 tokens (auto:pure_sdpa)" in out
    assert "context lengths: ollama:qwen3.5:35b 262144, sidecar 8192" in out
    assert "sidecar  UP" in out and "smollm2-135m-instruct (pure_sdpa), context 8192" in out
    assert "KV cache: TurboQuant affine K4/V4 bits, group 64, 30/30 layers compressed" in out
    assert "6,480 B/token vs 23,040 fp16 (3.56x smaller)" in out
    assert "1 active, 0 queued; their KV cache holds 1.0 MB (fp16 would be 4.0 MB)" in out
    assert "mlx_active 300.0 MB, prompt_cache_entries 2" in out
    assert "ollama   UP" in out and "version 0.19.2" in out and "qwen3.5:35b (22.0 GB)" in out
    assert "memory   " in out and "GB total" in out


def test_router_down_exits_1_and_sidecar_still_shown(tmp_path):
    with serve({"/health": (503, {"status": "loading"})}) as sp:
        r = _status(
            tmp_path,
            ROUTER_PORT=free_port(),
            SIDECAR_PORT=sp,
            OLLAMA_URL=f"http://127.0.0.1:{free_port()}",
        )
    assert r.returncode == 1
    assert "router   DOWN" in r.stdout
    assert "sidecar  LOADING" in r.stdout
    assert "ollama   DOWN" in r.stdout


def test_router_without_backends_exits_2_and_json(tmp_path):
    down = dict(ROUTER_HEALTH, status="down", sidecar_available=False)
    with serve({"/health": (503, down)}) as rp:
        r = _status(
            tmp_path,
            "--json",
            ROUTER_PORT=rp,
            SIDECAR_PORT=free_port(),
            OLLAMA_URL=f"http://127.0.0.1:{free_port()}",
        )
    assert r.returncode == 2, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["router"]["up"] is True and report["router"]["serving"] is False
    assert report["sidecar"]["up"] is False and report["ollama"]["up"] is False


def test_status_sh_uses_the_install(tmp_path):
    # No install at TQSTACK_HOME: the wrapper falls back to the checkout's venv and works.
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "status.sh"), "--timeout", "0.5"],
        env=clean_env(TQSTACK_HOME=str(tmp_path), ROUTER_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "router   DOWN" in r.stdout


@pytest.mark.parametrize("busy", [False, True])
def test_preflight_ports(tmp_path, busy):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1] if busy else free_port()
    if not busy:
        sock.close()
    try:
        env = clean_env(
            TQSTACK_HOME=str(tmp_path / "home"),
            ROUTER_PORT=str(port),
            SIDECAR_PORT=str(free_port()),
            OLLAMA_URL=f"http://127.0.0.1:{free_port()}",
        )
        r = subprocess.run(
            ["bash", str(REPO / "scripts" / "preflight-check.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        sock.close()
    if busy:
        assert (
            r.returncode == 1
            and f"port {port} (ROUTER_PORT) is used by another program" in r.stdout
        )
    else:
        assert r.returncode == 0, r.stdout
        assert f"port {port} free" in r.stdout and "Ollama not found" in r.stdout


def test_render_plain_cache_and_loading_failure():
    from services.status import render

    plain = dict(
        SIDECAR_HEALTH,
        cache={
            "type": "mlx-lm plain KVCache",
            "turboquant": False,
            "kv_bytes_per_token_fp16": 23040,
            "kv_bytes_per_token_actual": 23040,
        },
    )
    report = {
        "config": "/x/config.env",
        "router_url": "http://127.0.0.1:1",
        "router": {"up": False, "serving": False, "code": None, "health": "ConnectError"},
        "sidecar": {
            "url": "http://127.0.0.1:2",
            "up": True,
            "loading": False,
            "code": 200,
            "health": plain,
        },
        "ollama": {
            "url": "http://127.0.0.1:3",
            "up": False,
            "version": None,
            "loaded": [],
            "model": "m",
        },
        "memory": {"total": 8 * 2**30},
        "memory_saver": "auto",
        "services": {"mode": None, "pids": {}},
    }
    out = render(report)
    assert "router   DOWN   http://127.0.0.1:1   (ConnectError)" in out
    assert "KV cache: plain mlx-lm cache (TQ_ENABLED=0), 23,040 B/token\n" in out
    assert "memory   8.0 GB total; memory saver: auto" in out
