"""What every fake backend shares: faults, journal, control endpoints, request recording."""

from __future__ import annotations

import json
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .faults import Faults, Journal, Recorded
from .server import UpstreamServer
from .sse import DONE, FakeStream, data


class FakeBackend:
    """Base of the fakes: ``faults`` to flip, ``journal`` to read, ``server`` to run."""

    name = "fake"

    def __init__(self, port: int | None = None) -> None:
        self.faults = Faults()
        self.journal = Journal()
        inner = Starlette(routes=self.routes() + self._control_routes())

        async def app(scope, receive, send):
            # keep uvicorn's own send: its transport lets a fault drop the connection
            scope["raw_send"] = send
            await inner(scope, receive, send)

        self.app = app
        self.server = UpstreamServer(self.app, port)

    # --- lifecycle
    @property
    def url(self) -> str:
        return self.server.url

    def start(self):
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- to override
    def routes(self) -> list[Route]:
        raise NotImplementedError

    # --- helpers for subclasses
    async def record(self, request: Request) -> Any:
        """Read and record the request; returns the parsed JSON body (or raw text)."""
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self.journal.add(Recorded(request.method, request.url.path, dict(request.headers), body))
        return body

    async def generation_faults(self, request: Request) -> Response | None:
        """Apply the pre-response faults of a generation request (delay, close, error)."""
        f = self.faults
        if f.delay_headers_s:
            await anyio.sleep(f.delay_headers_s)
        if f.close_without_response:
            transport = getattr(
                getattr(request.scope["raw_send"], "__self__", None), "transport", None
            )
            if transport is not None:
                transport.close()
            return Response(status_code=204)  # never reaches the client
        if f.error_status:
            return self.error(f.error_status, f.error_message)
        return None

    def error(self, status: int, message: str) -> Response:
        raise NotImplementedError

    # --- control plane, for chaos runs against a fake in another process
    def _control_routes(self) -> list[Route]:
        async def set_faults(request: Request) -> Response:
            body = await request.json()
            if body.get("reset"):
                self.faults.reset()
            self.faults.update(**{k: v for k, v in body.items() if k != "reset"})
            return JSONResponse(self.faults.to_json())

        async def state(request: Request) -> Response:
            return JSONResponse({"faults": self.faults.to_json(), **self.journal.to_json()})

        return [
            Route("/_control/faults", set_faults, methods=["POST"]),
            Route("/_control/state", state, methods=["GET"]),
        ]

    def text_completion(self, body: dict[str, Any], base: dict[str, Any]) -> Response:
        """A ``/v1/completions`` answer (both backends send the same shape), streamed or not."""
        pieces = words(self.faults.reply_tokens)
        if not body.get("stream"):
            return JSONResponse(
                {
                    **base,
                    "choices": [{"text": "".join(pieces), "index": 0, "finish_reason": "stop"}],
                    "usage": {
                        "prompt_tokens": 1,
                        "completion_tokens": len(pieces),
                        "total_tokens": 1 + len(pieces),
                    },
                }
            )
        events = [
            data({**base, "choices": [{"text": p, "index": 0, "finish_reason": None}]})
            for p in pieces
        ]
        events.append(
            data({**base, "choices": [{"text": "", "index": 0, "finish_reason": "stop"}]})
        )
        events.append(DONE)
        return FakeStream(events, self.faults, self.journal)


def words(n: int) -> list[str]:
    """``n`` deterministic content pieces."""
    base = ["Hello", " from", " the", " fake", " backend", "."]
    return [base[i % len(base)] for i in range(max(1, n))]


def prompt_chars(body: dict[str, Any]) -> int:
    msgs = body.get("messages") or []
    return sum(len(m.get("content") or "") for m in msgs if isinstance(m.get("content"), str))
