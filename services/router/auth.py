"""The gate every request passes: request id, Bearer auth, body size limit, default headers.

A pure ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware, and it never buffers
a streamed response). ``/health`` stays open so monitors work without the key.
"""

from __future__ import annotations

import hmac
import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import APIError

log = logging.getLogger("tqstack.router")

OPEN_PATHS = frozenset({"/health"})


def new_request_id() -> str:
    """A unique id for one request (Ollama's own ``chatcmpl-<n>`` ids repeat)."""
    return "req_" + uuid.uuid4().hex


def bearer_ok(authorization: str | None, api_key: str) -> bool:
    """True when ``authorization`` is ``Bearer <api_key>`` (constant-time comparison)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class GateMiddleware:
    """Assigns ``x-request-id``, enforces the API key and the declared body size."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                if b"x-request-id" not in names:
                    headers.append(rid_header)
                if b"x-tqstack-backend" not in names:
                    # answered by the router itself (errors, /health, /v1/models...)
                    headers.append((b"x-tqstack-backend", b"router"))
                    headers.append((b"x-tqstack-route", b"none"))
                message = {**message, "headers": headers}
            await send(message)

        error = self._refuse(scope)
        if error is not None:
            await error.response()(scope, receive, send_with_id)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send_with_id(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as e:
            # a bug of ours: still an OpenAI-shaped 500 with the request id, never a bare one
            if started:
                raise
            err = APIError(500, f"Internal error in router: {type(e).__name__}", component="router")
            await err.response()(scope, receive, send_with_id)
            log.exception("unhandled error in the router")

    def _refuse(self, scope: Scope) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization")
            if not bearer_ok(auth.decode("latin-1") if auth else None, self.api_key):
                return APIError(
                    401,
                    "Invalid or missing API key: send 'Authorization: Bearer <TQSTACK_API_KEY>'.",
                    code="invalid_api_key",
                    component="router",
                    should_retry=False,
                    headers={"www-authenticate": "Bearer"},
                )
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body
            except ValueError:
                return APIError(
                    400, "Invalid Content-Length header.", component="router", should_retry=False
                )
            if too_big:
                return request_too_large(self.max_body)
        return None


def request_too_large(limit: int) -> APIError:
    """413 for a body over ``MAX_REQUEST_BYTES``."""
    return APIError(
        413,
        f"Request body is larger than the limit of {limit} bytes (MAX_REQUEST_BYTES).",
        code="request_too_large",
        component="router",
        should_retry=False,
    )
