"""64 concurrent streams through the router, all complete and intact (512 in the bench)."""

from __future__ import annotations

import asyncio
import json
import threading

from tests.upstreams.base import words

from .conftest import chat
from .load import client_for

N = 64


async def stream_all(url: str, n: int) -> list[str]:
    all_open = asyncio.Barrier(n)
    async with client_for(url, n) as client:

        async def one(i: int) -> str:
            body = chat(f"stream {i}", stream=True)
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                text = ""
                first = True
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and first:
                        first = False
                        await all_open.wait()  # every stream has started and none has ended
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:])["choices"]:
                            text += ch["delta"].get("content") or ""
                    elif line.startswith("data:"):
                        assert line == "data: [DONE]"
                return text

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_64_concurrent_streams(rel_router, ollama, sidecar) -> None:
    # 30 pieces 100 ms apart: each stream lasts ~3 s, longer than opening all 64 takes here
    ollama.faults.update(chunk_delay_s=0.1, reply_tokens=30)
    r = rel_router(ollama.url, sidecar.url)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], ollama.journal.active_streams)

    t = threading.Thread(target=sample)
    t.start()
    try:
        texts = asyncio.run(stream_all(r.url, N))
    finally:
        stop.set()
        t.join()
    assert texts == ["".join(words(30))] * N  # every piece of every stream, in order
    assert peak[0] == N, f"only {peak[0]} streams were open at once"
    r.wait_for(lambda: r.state.active_streams == 0)
