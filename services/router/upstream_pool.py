"""Upstream HTTP clients whose connection pools do not leak on cancellation.

httpcore 1.0.9 leaves a connection behind when the request that owns it is cancelled
between the pool handing it over and the HTTP/1.1 exchange starting (a client that
disconnects before the backend answered does exactly that). The connection is then
neither idle nor closed, so the pool never reuses, expires or closes it: an open socket
and a pool entry per occurrence, for the life of the process (encode/httpcore#1093).
"""

from __future__ import annotations

import ssl

import httpcore
import httpx


class ReapingConnectionPool(httpcore.AsyncConnectionPool):
    """An ``AsyncConnectionPool`` that closes connections no request owns any more.

    HTTP/1.1 only: a busy connection always belongs to the request it serves, so a busy
    connection that no pending request points at is an orphan.
    """

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        owned = {id(r.connection) for r in self._requests if r.connection is not None}
        orphans = [
            c
            for c in self._connections
            if id(c) not in owned and not c.is_idle() and not c.is_closed()
        ]
        for c in orphans:
            self._connections.remove(c)
        return orphans + super()._assign_requests_to_connections()


def upstream_client(
    timeout: httpx.Timeout, limits: httpx.Limits, tls: ssl.SSLContext | None = None
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for relaying to a backend, with a reaping pool; ``tls``: a
    context several clients share (each new one loads the CA bundle: ~15-30 ms)."""
    transport = httpx.AsyncHTTPTransport(
        verify=tls if tls is not None else True, limits=limits, trust_env=False
    )
    pool = transport._pool
    # Same object, extra cleanup: swap the class only where it is the pool we know.
    if type(pool) is httpcore.AsyncConnectionPool:
        pool.__class__ = ReapingConnectionPool
    return httpx.AsyncClient(timeout=timeout, transport=transport, trust_env=False)
