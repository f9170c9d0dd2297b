"""Run an ASGI app on a loopback port in a background thread (start, stop, restart)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _serve(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    finally:
        # A forced uvicorn exit leaves connections with a response in flight open when the
        # loop ends (their sockets leak, and a client pooling one waits for a reply that never
        # comes). Reset them, as the OS does when a backend process dies.
        for conn in list(server.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()


class UpstreamServer:
    """A uvicorn server for a fake upstream; ``stop()`` makes it really refuse connections."""

    def __init__(
        self, app, port: int | None = None, host: str = "127.0.0.1", lifespan: str = "off"
    ) -> None:
        self.app = app
        self.host = host
        self.lifespan = lifespan
        self.port = port or free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, timeout: float = 10.0) -> UpstreamServer:
        """Listen on ``self.port`` (the same port after a stop)."""
        if self._server is not None:
            return self
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="critical",
            lifespan=self.lifespan,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=lambda: asyncio.run(_serve(server)), daemon=True, name=f"upstream-{self.port}"
        )
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fake upstream did not start on {self.url}")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and drop open connections (the backend goes down)."""
        if self._server is None:
            return
        self._server.should_exit = True
        self._server.force_exit = True
        assert self._thread is not None
        self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
