"""uvicorn's HTTP/1.1 protocol, with its own 400s in the OpenAI error envelope.

Bytes that are not HTTP (or a malformed request line or header) are refused by the HTTP
parser before any ASGI app runs; uvicorn then answers ``400`` with a plain-text body. A
client of this stack expects ``{"error": {...}}`` from every non-2xx answer, so the server
processes run uvicorn with this protocol class instead (``http=...``).
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body


def enveloped_h11(component: str) -> type[H11Protocol]:
    """An ``H11Protocol`` whose parser-level 400 names ``component`` (router, sidecar)."""

    class EnvelopedH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(
                error_body(
                    f"{msg} The bytes sent are not a well-formed HTTP/1.1 request.",
                    400,
                    code="invalid_http",
                    component=component,
                )
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return EnvelopedH11Protocol
