"""Faults a fake upstream can be told to show, and what it records about its clients."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Faults:
    """Switches read on every request, so a test (or ``POST /_control/faults``) can flip them.

    ``down`` is not here: a down backend is a server that does not listen
    (:meth:`UpstreamServer.stop`), so connections are really refused.
    """

    delay_headers_s: float = 0.0  # slow: wait before the response starts
    chunk_delay_s: float = 0.0  # slow: wait between stream chunks
    die_after_chunks: int | None = None  # drop the connection after N chunks (mid-stream death)
    hang_after_headers: bool = False  # send 200 + headers, then nothing, forever
    hang_after_chunks: int | None = None  # send N chunks, then nothing, forever
    garbage_sse: bool = False  # a non-SSE line after the first chunk
    silent_end_after_chunks: int | None = None  # end cleanly after N chunks: no finish, no [DONE]
    error_event_after_chunks: int | None = None  # send N chunks, an SSE error event, then end
    close_without_response: bool = False  # read the request, then close the connection
    error_status: int | None = None  # answer generation requests with this error status
    error_message: str = "injected failure"
    health_status: int | None = None  # force this status on the health endpoint
    reply_tokens: int = 4  # content pieces per answer
    keepalive_comments: int = 0  # sidecar: ': keepalive' comments before the first token

    def update(self, **changes: Any) -> None:
        names = {f.name for f in fields(self)}
        for k, v in changes.items():
            if k not in names:
                raise KeyError(f"unknown fault {k!r}")
            setattr(self, k, v)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)


class Journal:
    """Thread-safe record of requests, stream disconnects and stream completions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.disconnects: list[float] = []  # monotonic time a stream saw its client leave
        self.completed_streams = 0
        self.active_streams = 0

    def add(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def paths(self, prefix: str = "") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def generations(self) -> list[Recorded]:
        """Requests to the OpenAI generation endpoints."""
        return [r for r in self.paths("/v1/") if r.path.endswith("completions")]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.disconnects.clear()
            self.completed_streams = 0

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": [
                    {"method": r.method, "path": r.path, "headers": r.headers, "body": r.body}
                    for r in self.requests
                ],
                "disconnects": len(self.disconnects),
                "completed_streams": self.completed_streams,
                "active_streams": self.active_streams,
            }
