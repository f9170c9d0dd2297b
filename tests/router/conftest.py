"""Fixtures for router tests: fake backends on loopback and a router app served in a thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from services.config import Settings, load_settings
from services.router.app import create_app
from tests.upstreams import FakeOllama, FakeSidecar, UpstreamServer

OLLAMA_MODEL = "qwen3.5:35b-a3b-coding-nvfp4"
SIDECAR_MODEL = "mlx-community/SmolLM2-135M"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def without_httptools(monkeypatch) -> None:
    """``import httptools`` fails, as on a machine without it."""
    import builtins

    real = builtins.__import__

    def no_httptools(name, *args, **kwargs):
        if name == "httptools":
            raise ImportError("no httptools here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_httptools)


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    fake = FakeOllama().start()
    yield fake
    fake.stop()


@pytest.fixture
def sidecar() -> Iterator[FakeSidecar]:
    fake = FakeSidecar(model=SIDECAR_MODEL).start()
    yield fake
    fake.stop()


def router_settings(ollama_url: str, sidecar_url: str, **overrides: object) -> Settings:
    """Settings for a test router: fast health checks, no config.env, memory saver off."""
    values: dict[str, object] = {
        "ollama_url": ollama_url,
        "sidecar_url": sidecar_url,
        "ollama_model": OLLAMA_MODEL,
        "health_interval_s": 0.2,
        "health_timeout_s": 0.5,
        "health_failures_down": 1,
        "upstream_connect_timeout_s": 1.0,
        "upstream_read_timeout_s": 5.0,
        "memory_saver": "0",
        "prompt_token_threshold": "auto",
        "tqstack_api_key": None,
    }
    values.update(overrides)
    return load_settings("/nonexistent/config.env", **values)


class RouterHandle:
    """A running router: its URL, a client for it, and the app's state."""

    def __init__(self, server: UpstreamServer, app) -> None:
        self.server = server
        self.app = app
        self.url = server.url
        self.client = httpx.Client(base_url=server.url, timeout=30.0)

    @property
    def state(self):
        return self.app.state.router

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` (e.g. a health state) until true."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not reached")
            time.sleep(0.02)

    def backend_state(self, name: str) -> str:
        return self.client.get("/health").json()["backends"][name]["state"]


@pytest.fixture
def make_router() -> Iterator[Callable[..., RouterHandle]]:
    """``make_router(ollama_url, sidecar_url, **settings)`` starts a router; all stop at the end."""
    handles: list[RouterHandle] = []

    def make(ollama_url: str, sidecar_url: str, **overrides: object) -> RouterHandle:
        app = create_app(router_settings(ollama_url, sidecar_url, **overrides))
        server = UpstreamServer(app, lifespan="on").start()
        h = RouterHandle(server, app)
        handles.append(h)
        return h

    yield make
    for h in handles:
        h.client.close()
        h.server.stop()


@pytest.fixture
def router(make_router, ollama: FakeOllama, sidecar: FakeSidecar) -> RouterHandle:
    """A router in front of both fakes, both up."""
    return make_router(ollama.url, sidecar.url)


def chat(content: str = "hi", model: str = OLLAMA_MODEL, **extra: object) -> dict:
    """A chat request body."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
