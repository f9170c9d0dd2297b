"""Relay one request upstream and its answer back: body normalisation, error mapping, streams.

Streams are relayed byte for byte as they arrive. The first upstream chunk is read before
the client gets any header, so a backend that fails before its first byte can still be
swapped for the other one; after that, a failure becomes an SSE error event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
from starlette.types import Receive, Scope, Send

from services.errors import APIError

from .routing import OLLAMA, Backend

# Headers we send upstream: built from scratch, so the client's Authorization and its
# hop-by-hop headers (Connection, Keep-Alive, TE, Upgrade...) never reach a backend.
_FORWARDED_CLIENT_HEADERS = ("user-agent", "accept-language")
MAX_ERROR_BODY = 64 * 1024
MAX_SSE_LINE = 16 * 1024 * 1024


def normalise_body(body: dict[str, Any], backend: Backend, model: str) -> dict[str, Any]:
    """The request body as ``backend`` should see it (a shallow copy; ``body`` is untouched).

    - ``model`` becomes the backend's own id;
    - ``max_completion_tokens`` becomes ``max_tokens`` (Ollama drops the former silently);
    - ``tools: []`` is dropped (strict servers reject it), with its orphan ``tool_choice``.
    ``stream_options`` and everything else pass through.
    """
    out = dict(body)
    out["model"] = model
    mct = out.get("max_completion_tokens")
    if mct is not None and out.get("max_tokens") is None:
        out["max_tokens"] = mct
    if backend == OLLAMA:
        out.pop("max_completion_tokens", None)
    if "tools" in out and not out["tools"]:
        out.pop("tools")
        out.pop("tool_choice", None)
        out.pop("parallel_tool_calls", None)
    return out


def upstream_headers(client_headers: Any, request_id: str, stream: bool) -> dict[str, str]:
    """Headers for the upstream request (an allow-list, never the client's credentials)."""
    h = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        # raw bytes are relayed as they are: they must not be compressed
        "accept-encoding": "identity",
        "x-request-id": request_id,
    }
    for k in _FORWARDED_CLIENT_HEADERS:
        v = client_headers.get(k)
        if v:
            h[k] = v
    return h


def map_upstream_error(
    backend: Backend, status: int, content: bytes, headers: Any = None
) -> APIError:
    """Turn a backend's error answer into our OpenAI envelope with a fitting status.

    Ollama already speaks the envelope; mlx-lm style servers answer ``{"error": "text"}``
    with 404 for every failure, and some answer plain text. The result names the backend
    in ``component``.
    """
    message: str | None = None
    etype = param = code = None
    try:
        data = json.loads(content) if content else None
    except ValueError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    enveloped = isinstance(err, dict)
    if enveloped:
        message = err.get("message") if isinstance(err.get("message"), str) else None
        etype = err.get("type") if isinstance(err.get("type"), str) else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
        code = err.get("code") if isinstance(err.get("code"), str) else None
    elif isinstance(err, str):
        message = err
    elif isinstance(data, dict) and isinstance(data.get("detail"), str):
        message = data["detail"]
    elif content:
        message = content[:500].decode("utf-8", "replace").strip()
    message = message or f"{backend} answered HTTP {status}"

    out_status = status
    low = message.lower()
    if not enveloped and status == 404:
        # mlx-lm's 404-for-everything: only a missing model is really "not found"
        out_status = 404 if ("model" in low and "not found" in low) else 502
    elif status == 500 or (status > 503 and status != 504):
        out_status = 502
    elif status < 400:
        out_status = 502
    if out_status == 404 and code is None and "model" in low:
        code = "model_not_found"
    if out_status in (502, 504) and etype is None:
        etype = "server_error"
    if out_status in (401, 403):
        # a backend's auth problem is ours to fix, not the client's key
        out_status, etype, code = 502, "server_error", code or "upstream_auth_error"
    if out_status >= 500 and code is None:
        code = "upstream_error"
    retry = None
    out_headers: dict[str, str] = {}
    upstream_retry_after = headers.get("retry-after") if headers is not None else None
    if out_status in (429, 503):
        # the backend said "later": keep its own delay when it gave one
        out_headers["retry-after"] = upstream_retry_after or "1"
    if out_status == 503:
        retry = True
    elif 400 <= out_status < 500 and out_status not in (408, 409, 429):
        retry = False
    return APIError(
        out_status,
        f"{backend}: {message}" if not message.startswith(backend) else message,
        type=etype if out_status < 500 or etype else None,
        param=param,
        code=code,
        component=backend,
        headers=out_headers,
        should_retry=retry,
    )


class BeforeFirstByte(Exception):
    """The upstream failed before sending anything: the request may go to the other backend."""

    def __init__(self, kind: str, message: str, error: APIError | None = None) -> None:
        super().__init__(message)
        self.kind = kind  # connect | closed | unavailable
        self.error = error  # the backend's own answer, when it gave one


def timeout_error(backend: Backend, phase: str) -> APIError:
    """504 for a backend that accepted the request but did not answer in time."""
    return APIError(
        504,
        f"{backend} did not answer in time ({phase}).",
        type="timeout_error",
        code="upstream_timeout",
        component=backend,
        # the backend may still be generating: a retry would duplicate the work
        should_retry=False,
    )


def bad_gateway(backend: Backend, message: str) -> APIError:
    return APIError(
        502, f"{backend}: {message}", type="server_error", code="upstream_error", component=backend
    )


class Upstream:
    """An upstream response with its first chunk already read (stream requests)."""

    def __init__(
        self, response: httpx.Response, chunks: AsyncIterator[bytes], first: bytes, started: float
    ) -> None:
        self.response = response
        self.chunks = chunks
        self.first = first
        self.started = started


async def send_upstream(
    client: httpx.AsyncClient,
    backend: Backend,
    url: httpx.URL | str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
) -> Upstream | tuple[httpx.Response, bytes]:
    """Send one request; return the opened stream or the full (status-2xx) body.

    Raises :class:`BeforeFirstByte` when nothing came back (connection refused or closed
    before any byte), :class:`APIError` for an upstream error answer or a timeout.
    """
    started = time.perf_counter()
    req = client.build_request("POST", url, content=body, headers=headers)
    try:
        resp = await client.send(req, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        raise BeforeFirstByte("connect", f"{backend}: cannot connect") from e
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
        raise BeforeFirstByte("closed", f"{backend}: connection closed before answering") from e
    except httpx.TimeoutException as e:
        raise timeout_error(backend, "waiting for response headers") from e
    except httpx.HTTPError as e:
        raise bad_gateway(backend, type(e).__name__) from e

    try:
        if resp.status_code >= 400:
            content = b""
            async for piece in resp.aiter_raw():
                content += piece
                if len(content) > MAX_ERROR_BODY:
                    break
            err = map_upstream_error(backend, resp.status_code, content, resp.headers)
            if resp.status_code == 503:
                # "not now" (loading, busy) before any work: the other backend may take it
                raise BeforeFirstByte("unavailable", err.message, err)
            raise err
        if not stream:
            content = await resp.aread()
            await resp.aclose()
            return resp, content
        chunks = resp.aiter_raw()
        first = b""
        while not first:  # skip empty reads; a stream always carries at least one event
            first = await chunks.__anext__()
        return Upstream(resp, chunks, first, started)
    except StopAsyncIteration as e:
        await resp.aclose()
        raise BeforeFirstByte("closed", f"{backend}: stream ended before any data") from e
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        await resp.aclose()
        raise BeforeFirstByte("closed", f"{backend}: connection closed before any data") from e
    except httpx.TimeoutException as e:
        await resp.aclose()
        raise timeout_error(backend, "waiting for the first byte") from e
    except BaseException:
        await resp.aclose()
        raise


class SSEChecker:
    """Watches relayed SSE bytes: sees ``[DONE]``, upstream error events and garbage."""

    __slots__ = ("buf", "done", "errored")

    def __init__(self) -> None:
        self.buf = b""
        self.done = False
        self.errored = False

    def feed(self, chunk: bytes) -> str | None:
        """Check the complete lines in ``chunk``; return a problem description or None."""
        buf = self.buf + chunk if self.buf else chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl].rstrip(b"\r")
            start = nl + 1
            if not line or line[:1] == b":":
                continue
            if line[:5] == b"data:":
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                elif payload[:1] == b"{" and payload[-1:] == b"}":
                    if payload[:9] == b'{"error":' or payload[:10] == b'{"error": ':
                        self.errored = True
                else:
                    return "the backend sent a malformed SSE data line"
            elif line[:6] in (b"event:", b"retry:") or line[:3] == b"id:":
                continue
            else:
                return "the backend sent data that is not SSE"
        self.buf = buf[start:]
        if len(self.buf) > MAX_SSE_LINE:
            return "the backend sent an SSE line too long to be valid"
        return None


def stream_error_event(backend: Backend, message: str, code: str) -> bytes:
    """One SSE event carrying an OpenAI error (the SDK raises it mid-stream)."""
    err = APIError(502, f"{backend}: {message}", type="server_error", code=code, component=backend)
    # a blank line first ends any half-sent event so the error parses on its own
    return b"\n" + err.sse_event()


class RelayResponse:
    """ASGI response relaying an upstream SSE stream, cancelled at once on client disconnect.

    ``on_done(outcome)`` is called exactly once with ``"ok"``, ``"disconnect"`` or an error
    kind, after the upstream response is closed.
    """

    background = None  # read by Starlette/FastAPI on any Response-like object

    def __init__(
        self,
        upstream: Upstream,
        backend: Backend,
        headers: dict[str, str],
        on_done: Callable[[str], None],
        on_first_byte: Callable[[], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.backend = backend
        self.headers = headers
        self.on_done = on_done
        self.on_first_byte = on_first_byte
        self._finished = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        outcome = "ok"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    nonlocal outcome
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            if self._finished:  # servers say "disconnect" after the end too
                                return
                            outcome = "disconnect"
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch_disconnect)
                result = await self._relay(send)
                if outcome == "ok":
                    outcome = result
                tg.cancel_scope.cancel()
        except OSError:  # the client went away while we were writing
            outcome = "disconnect"
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.response.aclose()
            self.on_done(outcome)

    async def _relay(self, send: Send) -> str:
        checker = SSEChecker()
        up = self.upstream
        chunk = up.first
        problem = checker.feed(chunk)
        # Relay whole lines only: a half line cut by a failure would glue onto our error
        # event and make it unparseable. The checker holds the incomplete tail.
        pending = b""

        def whole_lines(chunk: bytes) -> bytes:
            nonlocal pending
            data = pending + chunk
            cut = len(data) - len(checker.buf)
            pending = data[cut:]
            return data[:cut]

        if problem is None:
            await send(
                {"type": "http.response.body", "body": whole_lines(chunk), "more_body": True}
            )
            if self.on_first_byte:
                self.on_first_byte()
            try:
                async for chunk in up.chunks:
                    problem = checker.feed(chunk)
                    if problem:
                        break
                    out = whole_lines(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
            except httpx.TimeoutException:
                problem, kind = "stopped sending data (read timeout)", "timeout"
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.StreamError):
                problem, kind = "connection lost mid-stream", "midstream"
            else:
                kind = "garbage" if problem else "ok"
        else:
            kind = "garbage"
        if problem is None and pending:
            await send({"type": "http.response.body", "body": pending, "more_body": True})
        if problem is None and not checker.done and not checker.errored:
            # Ollama ends a failed stream silently: say so instead of a quiet cut
            problem, kind = "stream ended before completion", "truncated"
        if problem and not checker.errored:
            code = "upstream_timeout" if kind == "timeout" else "upstream_stream_error"
            await send(
                {
                    "type": "http.response.body",
                    "body": stream_error_event(self.backend, problem, code),
                    "more_body": True,
                }
            )
        self._finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return kind
