"""Fixtures for reliability checks: the router's fakes and helpers, plus leak probes.

The fake backends and the threaded router come from ``tests/router/conftest.py`` (reused,
not copied); ``rel_router`` additionally remembers the router's event loop so a test can
count its tasks and its upstream connections after a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Callable, Iterator

import pytest

from services.router.app import create_app
from tests.conftest import PYTHON, REPO, stop_process, wait_http
from tests.router.conftest import (  # noqa: F401  (fixtures re-exported for this package)
    OLLAMA_MODEL,
    SIDECAR_MODEL,
    RouterHandle,
    anyio_backend,
    chat,
    make_router,
    ollama,
    router,
    router_settings,
    sidecar,
)
from tests.upstreams import UpstreamServer

LONG = "word " * 6000  # ~7,500 estimated tokens: over the pure-SDPA threshold, to the sidecar


def lone_router_env(python_env: dict[str, str], tmp_path, port: int, **extra: str) -> dict:
    """Environment for a real router process on ``port`` with no config file, no sidecar and
    an Ollama address nothing answers on (the discard port)."""
    return {
        **python_env,
        "TQSTACK_CONFIG": str(tmp_path / "none.env"),
        "ROUTER_PORT": str(port),
        "OLLAMA_URL": "http://127.0.0.1:9",
        "SIDECAR_ENABLED": "0",
        **extra,
    }


@contextlib.contextmanager
def lone_router(env: dict[str, str], port: int) -> Iterator[subprocess.Popen]:
    """``python -m services.router`` with ``env``, answering /health (200 or 503) on
    ``port``; stopped on exit."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "services.router"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", ok=(200, 503), proc=proc, timeout=60)
        yield proc
    finally:
        stop_process(proc)


class ProbedRouter(RouterHandle):
    """A router handle that can count the router's live asyncio tasks and upstream sockets."""

    def __init__(self, server: UpstreamServer, app, loop_box: list) -> None:
        super().__init__(server, app)
        self._loop_box = loop_box

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop_box[0]

    def _in_loop(self, fn: Callable[[], object]) -> object:
        async def call() -> object:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(5)

    def tasks(self) -> int:
        """Tasks alive in the router's loop, minus the probe itself."""
        return self._in_loop(lambda: len(asyncio.all_tasks())) - 1  # type: ignore[operator]

    def upstream_connections(self) -> dict[str, int]:
        """The router's pooled upstream connections: how many, and how many are busy."""

        def count() -> dict[str, int]:
            # every pool the router relays through (httpcore.AsyncConnectionPool each)
            clients = getattr(self.state, "clients", None) or [self.state.client]
            pools = [c._transport._pool for c in clients]
            conns = [c for p in pools for c in p.connections]
            return {
                "total": len(conns),
                "busy": sum(1 for c in conns if not c.is_idle() and not c.is_closed()),
                "requests": sum(len(p._requests) for p in pools),
            }

        return self._in_loop(count)  # type: ignore[return-value]


@pytest.fixture
def rel_router() -> Iterator[Callable[..., ProbedRouter]]:
    """``rel_router(ollama_url, sidecar_url, **settings)``: a probed router; all stop at the end."""
    handles: list[ProbedRouter] = []

    def make(ollama_url: str, sidecar_url: str, **overrides: object) -> ProbedRouter:
        inner = create_app(router_settings(ollama_url, sidecar_url, **overrides))
        box: list = []

        async def app(scope, receive, send):
            if not box:
                box.append(asyncio.get_running_loop())
            await inner(scope, receive, send)

        app.state = inner.state  # type: ignore[attr-defined]
        server = UpstreamServer(app, lifespan="on").start()
        h = ProbedRouter(server, app, box)
        handles.append(h)
        h.client.get("/health")  # a first request: the loop is known from here on
        return h

    yield make
    for h in handles:
        h.client.close()
        h.server.stop()
