"""Drive many requests at a router from asyncio and tally the verdicts (tests and bench)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from .outcome import Outcome, Tally, request


def client_for(url: str, concurrency: int) -> httpx.AsyncClient:
    """An async client sized for ``concurrency`` open requests; no retries, no proxies."""
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=None, trust_env=False)


async def run_many(
    url: str,
    bodies: Iterable[tuple[str, dict[str, Any] | bytes]],
    *,
    concurrency: int,
    deadline_s: float,
    on_outcome: Callable[[Outcome], None] | None = None,
    headers: dict[str, str] | None = None,
) -> Tally:
    """Send every ``(path, body)`` with at most ``concurrency`` in flight; tally the verdicts."""
    tally = Tally()
    work = iter(bodies)  # shared by the workers: a lazy source stays lazy (50,000-request soak)
    async with client_for(url, concurrency) as client:

        async def worker() -> None:
            for path, body in work:
                o = await request(client, path, body, deadline_s=deadline_s, headers=headers)
                tally.add(o)
                if on_outcome:
                    on_outcome(o)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def run_many_sync(url: str, bodies, **kw: Any) -> Tally:
    """:func:`run_many` from synchronous code (pytest tests)."""
    return asyncio.run(run_many(url, bodies, **kw))
