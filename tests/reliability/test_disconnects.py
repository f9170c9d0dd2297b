"""Clients that disconnect mid-stream leave nothing behind: no upstream connection, no task.

A scaled-down run of ``bench/reliability.py disconnects`` (1,000 there, 100 here): each
client opens a stream, reads two events (or nothing, while the backend has not answered)
and drops the socket. Afterwards the fake backend has seen every disconnect, and the
router's live tasks, busy pooled connections and open streams are back to their baseline.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from .conftest import chat

N = 100


async def open_and_drop(port: int, body: dict, events_before_drop: int, before_drop=None) -> None:
    """One raw HTTP client that leaves after ``events_before_drop`` SSE events.

    ``before_drop()`` runs (synchronously, so nothing else happens) just before the drop.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
    )
    await writer.drain()
    got = b""
    while got.count(b"data:") < events_before_drop:
        piece = await asyncio.wait_for(reader.read(65536), 10)
        assert piece, "the router closed the stream before the client left"
        got += piece
    if events_before_drop == 0:
        await asyncio.sleep(0.2)  # the request is waiting on the backend
    if before_drop is not None:
        before_drop()
    writer.transport.abort()  # RST, like a killed client


async def drop_many(port: int, body: dict, events: int, n: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await open_and_drop(port, body, events)

    await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.parametrize(
    ("fault", "events"),
    [
        ({"hang_after_chunks": 3}, 2),
        ({"chunk_delay_s": 0.05, "reply_tokens": 400}, 2),
        ({"hang_after_headers": True}, 0),
    ],
    ids=["mid-stream-idle-backend", "mid-stream-busy-backend", "before-first-byte"],
)
def test_100_disconnects_leak_nothing(rel_router, ollama, sidecar, fault, events) -> None:
    # health polls every 30 s: no poll in flight to blur the count of busy connections
    r = rel_router(ollama.url, sidecar.url, upstream_read_timeout_s=30.0, health_interval_s=30.0)
    r.client.post("/v1/chat/completions", json=chat())  # warm: pool and lazy state exist
    r.wait_for(lambda: r.upstream_connections()["busy"] == 0)
    base_tasks = r.tasks()
    ollama.journal.clear()
    ollama.faults.update(**fault)

    asyncio.run(drop_many(r.server.port, chat(stream=True), events, N, concurrency=25))

    # every router-side request ended as a disconnect (499): none completed, none is stuck
    r.wait_for(lambda: count_499(r) == N, timeout=15)
    # every upstream request saw its client leave, and none is still open (a client that left
    # before the router had sent anything upstream costs the backend nothing at all)
    sent = len(ollama.journal.generations())
    assert sent >= N // 2 if events == 0 else sent == N
    try:
        r.wait_for(lambda: len(ollama.journal.disconnects) == sent, timeout=15)
    except TimeoutError:
        raise AssertionError(
            f"upstream saw {len(ollama.journal.disconnects)}/{sent} disconnects; "
            f"{ollama.journal.active_streams} still open; router streams {r.state.active_streams}, "
            f"pool {r.upstream_connections()}, generations {len(ollama.journal.generations())}"
        ) from None
    r.wait_for(lambda: ollama.journal.active_streams == 0)
    r.wait_for(lambda: r.state.active_streams == 0)
    r.wait_for(lambda: r.upstream_connections()["busy"] == 0)
    r.wait_for(lambda: r.tasks() <= base_tasks, timeout=5)
    conns = r.upstream_connections()
    assert conns["requests"] == 0, conns
    # the router still answers
    ollama.faults.reset()
    assert r.client.post("/v1/chat/completions", json=chat()).status_code == 200


def count_499(r) -> int:
    """Requests the router's metrics counted as client disconnects."""
    total = 0
    for line in r.client.get("/metrics").text.splitlines():
        if line.startswith("tqstack_router_requests_total{") and 'status="499"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total
