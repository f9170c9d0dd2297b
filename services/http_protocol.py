"""uvicorn's HTTP/1.1 protocol, with its own 400s in the OpenAI error envelope.

Bytes that are not HTTP (or a malformed request line or header) are refused by the HTTP
parser before any ASGI app runs; uvicorn then answers ``400`` with a plain-text body. A
client of this stack expects ``{"error": {...}}`` from every non-2xx answer, so the server
processes run uvicorn with one of these protocol classes instead (``http=...``): on
httptools (a C parser) where it is installed, else on h11 (pure Python: with the asyncio
loop, ~10 % more of the router's CPU a relayed stream; bench/router_overhead.py).
"""

from __future__ import annotations

import json

from .errors import error_body


def _envelope_400(msg: str, component: str) -> bytes:
    """The whole HTTP/1.1 response for a request the parser refused."""
    body = json.dumps(
        error_body(
            f"{msg} The bytes sent are not a well-formed HTTP/1.1 request.",
            400,
            code="invalid_http",
            component=component,
        )
    ).encode()
    head = (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
    )
    return head + body


def _enveloped(base: type, component: str) -> type:
    """``base`` (a uvicorn HTTP protocol) whose parser-level 400 names ``component``."""

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_envelope_400(msg, component))
        self.transport.close()

    return type(f"Enveloped{base.__name__}", (base,), {"send_400_response": send_400_response})


def enveloped_h11(component: str) -> type:
    """An ``H11Protocol`` whose parser-level 400 names ``component`` (router, sidecar)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return _enveloped(H11Protocol, component)


def enveloped_httptools(component: str) -> type | None:
    """The same on uvicorn's ``HttpToolsProtocol``, or None without httptools."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None
    return _enveloped(HttpToolsProtocol, component)


def enveloped_http(component: str, parser: str = "auto") -> type:
    """The protocol class for ``component``'s server: ``parser`` "httptools", "h11" or
    "auto" (httptools where installed)."""
    if parser != "h11":
        fast = enveloped_httptools(component)
        if fast is not None:
            return fast
        if parser == "httptools":
            raise RuntimeError("ROUTER_HTTP=httptools, but httptools is not installed")
    return enveloped_h11(component)
