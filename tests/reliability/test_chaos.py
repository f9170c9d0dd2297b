"""A scaled-down chaos run (the 10,000-request one is ``bench/reliability.py chaos``).

Both fake backends are stopped and restarted at random while 400 mixed requests run
(stream / non-stream, chat / completions, short / long routes). Lost, hung, malformed and
router-made 5xx answers must all be zero; afterwards every request succeeds again and the
router holds no stream, task or busy upstream connection.
"""

from __future__ import annotations

import json
import random
import threading
import time

from tests.upstreams import FakeOllama, FakeSidecar

from .conftest import LONG, OLLAMA_MODEL, chat
from .load import run_many_sync

DEADLINE = 8.0  # router read timeout 2 s; anything past this is a hang


def chaos_bodies(n: int, seed: int) -> list[tuple[str, dict]]:
    """``n`` requests: a quarter each of short/long x stream/non-stream, some completions."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        stream = rnd.random() < 0.5
        long = rnd.random() < 0.5
        if rnd.random() < 0.2:
            prompt = LONG if long else "hi"
            out.append(
                ("/v1/completions", {"model": OLLAMA_MODEL, "prompt": prompt, "stream": stream})
            )
        else:
            out.append(("/v1/chat/completions", chat(LONG if long else "hi", stream=stream)))
    return out


class Chaos(threading.Thread):
    """Stops one fake at a time for 20-200 ms, then restarts it, until told to stop."""

    def __init__(self, fakes, seed: int) -> None:
        super().__init__(daemon=True)
        self.fakes, self.rnd, self.halt = fakes, random.Random(seed), threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.halt.wait(self.rnd.uniform(0.05, 0.3)):
            fake = self.rnd.choice(self.fakes)
            fake.stop()
            self.kills += 1
            time.sleep(self.rnd.uniform(0.02, 0.2))
            fake.start()


def test_chaos_400_requests(rel_router) -> None:
    # a big Ollama context so long prompts can fall back to it as well
    ollama = FakeOllama(num_ctx=65536).start()
    sidecar = FakeSidecar().start()
    for f in (ollama, sidecar):
        f.faults.update(chunk_delay_s=0.003, reply_tokens=6)
    try:
        r = rel_router(ollama.url, sidecar.url, upstream_read_timeout_s=2.0, health_interval_s=0.1)
        chaos = Chaos([ollama, sidecar], seed=7)
        chaos.start()
        try:
            tally = run_many_sync(
                r.url, chaos_bodies(400, seed=1), concurrency=24, deadline_s=DEADLINE
            )
        finally:
            chaos.halt.set()
            chaos.join()
        s = json.dumps(tally.summary())
        assert chaos.kills >= 5, s
        assert tally.bad == 0, s
        assert tally.counts["ok"] > 200, s  # fallback keeps most requests whole
        assert all(not k.startswith("router:") for k in tally.upstream_errors), s

        # recovery: both back, every request succeeds, nothing left open in the router
        r.wait_for(lambda: r.backend_state("ollama") == r.backend_state("sidecar") == "up")
        after = run_many_sync(r.url, chaos_bodies(60, seed=2), concurrency=12, deadline_s=DEADLINE)
        assert after.counts["ok"] == 60, json.dumps(after.summary())
        r.wait_for(lambda: r.state.active_streams == 0)
        r.wait_for(lambda: r.upstream_connections()["busy"] == 0)
    finally:
        ollama.stop()
        sidecar.stop()
