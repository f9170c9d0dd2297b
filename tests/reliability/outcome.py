"""What a client got from the router, classified: the verdict every reliability check counts.

A request ends in exactly one of:

- ``ok``: a complete answer (JSON with choices, or an SSE stream with a finish reason and
  ``[DONE]``);
- ``error``: a well-formed OpenAI error (a JSON envelope with a 4xx/5xx status, or an SSE
  error event after which the stream ends); ``component`` says who failed;
- ``malformed``: bytes that are neither (bad JSON, an error without the envelope, data after
  an error event, a stream without ``[DONE]`` or an error);
- ``lost``: the connection broke or ended before any verdict (nothing the SDK could act on);
- ``hung``: no verdict before the client's deadline.

Shared by the pytest checks and ``bench/reliability.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

KINDS = ("ok", "error", "malformed", "lost", "hung")


@dataclass
class Outcome:
    """One request's verdict."""

    kind: str  # one of KINDS
    status: int | None = None
    component: str | None = None  # who failed, for errors: router | ollama | sidecar
    backend: str | None = None  # x-tqstack-backend
    detail: str = ""
    elapsed: float = 0.0

    @property
    def router_5xx(self) -> bool:
        """A 5xx that the router itself produced (not a backend failure passed through)."""
        return self.kind == "error" and (self.status or 0) >= 500 and self.component == "router"


def envelope_component(obj: Any) -> tuple[bool, str | None]:
    """(is a well-formed OpenAI error envelope, its component)."""
    if not isinstance(obj, dict) or set(obj) != {"error"}:
        return False, None
    err = obj["error"]
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return False, None
    if not isinstance(err.get("type"), str) or not err["message"]:
        return False, None
    for k in ("param", "code"):
        if k not in err or not (err[k] is None or isinstance(err[k], str)):
            return False, None
    comp = err.get("component")
    return comp in ("router", "ollama", "sidecar"), comp


def classify_json(status: int, body: bytes, backend: str | None = None) -> Outcome:
    """Verdict on a non-stream answer (or any non-200 answer)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return Outcome("malformed", status, backend=backend, detail="body is not JSON")
    if status == 200:
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if isinstance(choices, list) and choices and "error" not in obj:
            return Outcome("ok", status, backend=backend)
        return Outcome("malformed", status, backend=backend, detail="200 without choices")
    ok, comp = envelope_component(obj)
    if not ok or status < 400:
        return Outcome(
            "malformed", status, backend=backend, detail=f"bad error body {body[:200]!r}"
        )
    return Outcome("error", status, comp, backend, detail=obj["error"]["message"][:200])


def classify_sse(body: bytes, backend: str | None = None) -> Outcome:
    """Verdict on a 200 ``text/event-stream`` body read to its end."""
    finished = done = False
    error: str | None = None
    message = ""
    for raw in body.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line or line.startswith(b":"):
            continue
        if not line.startswith(b"data:"):
            return Outcome("malformed", 200, backend=backend, detail=f"non-SSE line {line[:80]!r}")
        payload = line[5:].strip()
        if error is not None or done:
            return Outcome("malformed", 200, backend=backend, detail="data after the end")
        if payload == b"[DONE]":
            done = True
            continue
        try:
            obj = json.loads(payload)
        except ValueError:
            return Outcome("malformed", 200, backend=backend, detail=f"bad event {payload[:80]!r}")
        if isinstance(obj, dict) and "error" in obj:
            ok, comp = envelope_component(obj)
            if not ok:
                return Outcome("malformed", 200, backend=backend, detail="error event shape")
            error = comp
            message = obj["error"]["message"][:200]
            continue
        for ch in obj.get("choices") or [] if isinstance(obj, dict) else []:
            if isinstance(ch, dict) and ch.get("finish_reason"):
                finished = True
    if error is not None:
        return Outcome("error", 200, error, backend, detail=message)
    if done and finished:
        return Outcome("ok", 200, backend=backend)
    if done:
        return Outcome("malformed", 200, backend=backend, detail="[DONE] without a finish reason")
    return Outcome("lost", 200, backend=backend, detail="stream ended without [DONE] or error")


async def request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any] | bytes,
    *,
    deadline_s: float,
    headers: dict[str, str] | None = None,
) -> Outcome:
    """Send one request and read the whole answer; never raises, never waits past the deadline."""
    t0 = time.perf_counter()
    stream = isinstance(body, dict) and bool(body.get("stream"))
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}

    seen: list[str] = []  # what had arrived when a transport error struck, for the report

    async def go() -> Outcome:
        async with client.stream("POST", path, content=content, headers=hdrs) as r:
            seen.append(f"status {r.status_code} from {r.headers.get('x-tqstack-backend')}")
            data = b""
            async for piece in r.aiter_raw():
                data += piece
                seen[1:] = [f"{len(data)} bytes"]
            backend = r.headers.get("x-tqstack-backend")
            ctype = r.headers.get("content-type", "")
            if r.status_code == 200 and stream:
                if not ctype.startswith("text/event-stream"):
                    return Outcome("malformed", 200, backend=backend, detail=f"ctype {ctype}")
                return classify_sse(data, backend)
            return classify_json(r.status_code, data, backend)

    try:
        out = await asyncio.wait_for(go(), deadline_s)
    except asyncio.TimeoutError:
        out = Outcome("hung", detail=f"no verdict in {deadline_s}s")
    except httpx.HTTPError as e:
        where = ", ".join(seen) or "before the response headers"
        out = Outcome("lost", detail=f"{type(e).__name__} ({where}) {path} stream={stream}")
    out.elapsed = time.perf_counter() - t0
    return out


@dataclass
class Tally:
    """Counts of outcomes over a run, with a few examples of each bad kind."""

    counts: Counter = field(default_factory=Counter)
    router_5xx: int = 0
    upstream_errors: Counter = field(default_factory=Counter)
    backends: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_elapsed: float = 0.0

    def add(self, o: Outcome) -> None:
        self.counts[o.kind] += 1
        self.max_elapsed = max(self.max_elapsed, o.elapsed)
        if o.backend:
            self.backends[o.backend] += 1
        if o.router_5xx:
            self.router_5xx += 1
        if o.kind == "error":
            self.upstream_errors[f"{o.component}:{o.status}"] += 1
        if o.kind in ("malformed", "lost", "hung", "error"):
            ex = self.examples.setdefault(o.kind, [])
            if len(ex) < 5:
                ex.append(f"{o.status} {o.component} {o.detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def bad(self) -> int:
        """Requests that broke the promise: lost, hung, malformed or a router 5xx."""
        c = self.counts
        return c["lost"] + c["hung"] + c["malformed"] + self.router_5xx

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.total,
            "ok": self.counts["ok"],
            "errors": self.counts["error"],
            "lost": self.counts["lost"],
            "hung": self.counts["hung"],
            "malformed": self.counts["malformed"],
            "router_5xx": self.router_5xx,
            "errors_by_component": dict(self.upstream_errors),
            "backends": dict(self.backends),
            "max_elapsed_s": round(self.max_elapsed, 3),
            "examples": self.examples,
        }
