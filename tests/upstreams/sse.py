"""Streaming pieces shared by the fakes: a disconnect-aware SSE response and fault playback."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .faults import Faults, Journal


class InjectedDeath(Exception):
    """Raised inside the ASGI app after bytes were sent: uvicorn drops the connection."""


def data(obj: Any) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class FakeStream(Response):
    """Sends ``events`` as SSE while watching for the client's disconnect.

    The faults in ``faults`` are applied between events; the journal records disconnects
    (with their time) and completed streams.
    """

    def __init__(
        self,
        events: list[bytes],
        faults: Faults,
        journal: Journal,
        prelude: list[bytes] | None = None,
    ) -> None:
        super().__init__(media_type="text/event-stream")
        # no Content-Length (Response would say 0): the body is chunked
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        self.events = events
        self.prelude = prelude or []
        self.faults = faults
        self.journal = journal

    async def _chunks(self) -> AsyncIterator[bytes]:
        f = self.faults
        for c in self.prelude:
            yield c
        for i, ev in enumerate(self.events):
            if f.hang_after_chunks is not None and i == f.hang_after_chunks:
                await anyio.sleep_forever()
            if f.die_after_chunks is not None and i == f.die_after_chunks:
                raise InjectedDeath("die mid-stream")
            if f.silent_end_after_chunks is not None and i == f.silent_end_after_chunks:
                return
            if f.error_event_after_chunks is not None and i == f.error_event_after_chunks:
                yield data(
                    {
                        "error": {
                            "message": f.error_message,
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                return
            if i and f.chunk_delay_s:
                await anyio.sleep(f.chunk_delay_s)
            yield ev
            if i == 0 and f.garbage_sse:
                yield b"this is not server-sent events\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        j = self.journal
        j.active_streams += 1
        died: list[BaseException] = []
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            j.disconnects.append(time.monotonic())
                            tg.cancel_scope.cancel()
                            return

                async def produce() -> None:
                    try:
                        if self.faults.hang_after_headers:
                            await anyio.sleep_forever()
                        async for chunk in self._chunks():
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                        j.completed_streams += 1
                    except InjectedDeath as e:
                        died.append(e)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                tg.start_soon(produce)
        finally:
            j.active_streams -= 1
        if died:
            raise died[0]
