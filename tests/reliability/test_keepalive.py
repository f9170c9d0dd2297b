"""Idle client connections outlive the clients' own keep-alive expiry.

httpx (and so the OpenAI SDK) reuses an idle connection for up to 5 s. A server that closes
idle connections at the same 5 s races with that reuse: a request written just as the server
closes is reset before any answer (seen as rare ``ReadError``s in the chaos bench). The
router, started the way users start it, must keep idle connections open longer.
"""

from __future__ import annotations

import socket
import time

from tests.conftest import free_port

from .conftest import lone_router, lone_router_env

CLIENT_KEEPALIVE_S = 5.0  # httpx.Limits().keepalive_expiry, the OpenAI SDK's default


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    out = b""
    while b"\r\n\r\n" not in out:
        piece = sock.recv(65536)
        if not piece:
            return out
        out += piece
    head, _, body = out.partition(b"\r\n\r\n")
    length = next(
        int(ln.split(b":")[1])
        for ln in head.split(b"\r\n")
        if ln.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_idle_connection_is_kept_past_the_clients_expiry(python_env, tmp_path) -> None:
    port = free_port()
    env = lone_router_env(python_env, tmp_path, port, LOG_LEVEL="WARNING")
    with lone_router(env, port), socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert _get(s).startswith(b"HTTP/1.1 ")
        time.sleep(CLIENT_KEEPALIVE_S + 1.0)  # idle longer than any httpx client would wait
        assert _get(s).startswith(b"HTTP/1.1 "), "the router closed an idle connection first"
