"""Backend faults with many clients at once: each gets a complete answer or a clean error.

Every scenario runs concurrent clients through the real router (loopback) and classifies
each answer (``outcome.py``); none may be lost, hung or malformed, and the router itself
never answers 5xx. Faults come from the fakes in ``tests/upstreams`` (reused).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.upstreams import UpstreamServer

from .conftest import LONG, OLLAMA_MODEL, chat
from .load import run_many_sync

CHAT = "/v1/chat/completions"
READ_TIMEOUT = 1.0  # router's upstream read timeout in these tests
DEADLINE = READ_TIMEOUT + 4.0  # a client waiting longer than this counts as hung


def mixed(n: int, model: str = "tq:auto", content: str = "hi") -> list[tuple[str, dict]]:
    """``n`` requests alternating stream / non-stream."""
    return [(CHAT, chat(content, model=model, stream=i % 2 == 0)) for i in range(n)]


def show(tally) -> str:
    """The tally as one line (pytest would truncate the dict)."""
    return json.dumps(tally.summary())


def assert_clean(tally) -> None:
    assert tally.bad == 0, show(tally)
    assert tally.max_elapsed < DEADLINE, show(tally)


def wait_until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- the sidecar dies, hangs or talks nonsense


def test_sidecar_killed_mid_stream(rel_router, ollama, sidecar) -> None:
    sidecar.faults.update(chunk_delay_s=0.05, reply_tokens=200)
    r = rel_router(ollama.url, sidecar.url, upstream_read_timeout_s=READ_TIMEOUT)
    n = 16

    def kill_when_streaming() -> None:
        wait_until(lambda: sidecar.journal.active_streams == n, timeout=10)
        sidecar.stop()  # stops listening and drops every open connection

    killer = threading.Thread(target=kill_when_streaming)
    killer.start()
    bodies = [(CHAT, chat(LONG, model="tq:auto", stream=True)) for _ in range(n)]
    tally = run_many_sync(r.url, bodies, concurrency=n, deadline_s=DEADLINE)
    killer.join()
    assert_clean(tally)
    # every stream was cut: each ended with an error event naming the sidecar
    assert tally.counts["error"] == n and tally.upstream_errors == {"sidecar:200": n}
    # the next requests go to Ollama (fallback) and succeed
    after = run_many_sync(r.url, mixed(10), concurrency=5, deadline_s=DEADLINE)
    assert after.counts["ok"] == 10 and after.backends == {"ollama": 10}, show(after)
    r.wait_for(lambda: r.state.active_streams == 0)


@pytest.mark.parametrize(
    ("fault", "stream"),
    [({"hang_after_headers": True}, True), ({"delay_headers_s": 60.0}, False)],
    ids=["stream-hangs-after-headers", "answer-never-starts"],
)
def test_sidecar_hung(rel_router, ollama, sidecar, fault, stream) -> None:
    sidecar.faults.update(**fault)
    r = rel_router(ollama.url, sidecar.url, upstream_read_timeout_s=READ_TIMEOUT)
    bodies = [(CHAT, chat(model="tq:auto", stream=stream)) for _ in range(12)]
    tally = run_many_sync(r.url, bodies, concurrency=12, deadline_s=DEADLINE)
    assert_clean(tally)
    # a timeout, not a retry elsewhere: the backend may still be generating
    assert tally.upstream_errors == {"sidecar:504": 12}, show(tally)
    assert tally.max_elapsed < READ_TIMEOUT + 1.5
    r.wait_for(lambda: r.state.active_streams == 0)


@pytest.mark.parametrize(
    "fault",
    [
        {"hang_after_chunks": 2},
        {"garbage_sse": True},
        {"silent_end_after_chunks": 2},
        {"die_after_chunks": 2},
        {"die_after_chunks": 0},
    ],
    ids=["hang-mid-stream", "garbage", "silent-end", "die-mid-stream", "die-at-first-event"],
)
def test_sidecar_stream_faults_end_with_an_error_event(rel_router, ollama, sidecar, fault) -> None:
    sidecar.faults.update(reply_tokens=6, **fault)
    r = rel_router(ollama.url, sidecar.url, upstream_read_timeout_s=READ_TIMEOUT)
    bodies = [(CHAT, chat(model="tq:auto", stream=True)) for _ in range(10)]
    tally = run_many_sync(r.url, bodies, concurrency=10, deadline_s=DEADLINE)
    assert_clean(tally)
    assert tally.counts["error"] + tally.counts["ok"] == 10
    assert set(tally.upstream_errors) <= {"sidecar:200"}, show(tally)
    if fault.get("die_after_chunks") == 0:
        # nothing was sent yet: the router may and should answer from Ollama instead
        assert tally.counts["ok"] == 10 and tally.backends == {"ollama": 10}, show(tally)
    else:
        # the first failures mark the sidecar down, so later requests may go to Ollama
        assert tally.counts["error"] >= 1, show(tally)
        assert tally.backends["ollama"] == tally.counts["ok"], show(tally)
    r.wait_for(lambda: r.state.active_streams == 0)


def _truncating_app(stream_piece: bytes, json_piece: bytes):
    """A sidecar that is healthy but cuts every answer in the middle of an event / body."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            body = b'{"status":"ok","model":"m","architecture":"pure_sdpa","context_length":32768}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        stream = b'"stream": true' in raw or b'"stream":true' in raw
        ctype = b"text/event-stream" if stream else b"application/json"
        headers = [(b"content-type", ctype)]
        if not stream:
            headers.append((b"content-length", b"500"))  # promises more than it sends
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {
                "type": "http.response.body",
                "body": stream_piece if stream else json_piece,
                "more_body": True,
            }
        )
        raise RuntimeError("truncated on purpose")  # uvicorn drops the connection

    return app


def test_sidecar_truncated_mid_event_and_mid_body(rel_router, ollama) -> None:
    fake = UpstreamServer(
        _truncating_app(
            b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"del',
            b'{"id":"x","object":"chat.completion","choi',
        )
    ).start()
    try:
        r = rel_router(ollama.url, fake.url, upstream_read_timeout_s=READ_TIMEOUT)
        r.wait_for(lambda: r.backend_state("sidecar") == "up")
        tally = run_many_sync(r.url, mixed(10), concurrency=10, deadline_s=DEADLINE)
    finally:
        fake.stop()
    assert_clean(tally)
    s = show(tally)
    # streams: a half event then a cut -> error event; bodies cut short -> Ollama answers
    # (nothing reached the client yet) or a clean 5xx naming the sidecar
    assert tally.counts["error"] >= 1, s
    assert set(tally.upstream_errors) <= {"sidecar:200", "sidecar:502"}, s


def test_backend_non_json_success_body_is_a_clean_502(rel_router, sidecar) -> None:
    """An "Ollama" that answers 200 with HTML: a 502 naming it, never relayed as an answer."""

    async def garbage(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"<html>oops</html>"})

    fake = UpstreamServer(garbage).start()
    try:
        r = rel_router(fake.url, sidecar.url)
        r.wait_for(lambda: r.backend_state("ollama") != "unknown")
        bodies = [(CHAT, chat("hi", model="ollama:" + OLLAMA_MODEL)) for _ in range(6)]
        tally = run_many_sync(r.url, bodies, concurrency=6, deadline_s=DEADLINE)
        assert r.client.get("/health").status_code == 200
    finally:
        fake.stop()
    assert_clean(tally)
    assert tally.upstream_errors == {"ollama:502": 6}, show(tally)


# --- backends down, returning, flapping


def _first_generation_after(fake, t: float) -> float | None:
    gens = [g.at for g in fake.journal.generations() if g.at >= t]
    return min(gens) if gens else None


def _health_polls_between(fake, t0: float, t1: float) -> int:
    return sum(
        1
        for q in fake.journal.requests
        if q.path in ("/health", "/api/version") and t0 <= q.at <= t1
    )


def test_ollama_down_at_start_then_returns_within_one_health_interval(
    rel_router, ollama, sidecar
) -> None:
    ollama.stop()
    r = rel_router(ollama.url, sidecar.url, health_interval_s=0.3)
    r.wait_for(lambda: r.backend_state("ollama") == "down")
    tally = run_many_sync(r.url, mixed(20, model=OLLAMA_MODEL), concurrency=5, deadline_s=DEADLINE)
    assert_clean(tally)
    assert tally.counts["ok"] == 20 and tally.backends == {"sidecar": 20}, show(tally)

    ollama.journal.clear()
    restarted = time.monotonic()
    ollama.start()
    routed = []
    deadline = restarted + 5
    while time.monotonic() < deadline and not routed:
        resp = r.client.post(CHAT, json=chat("hi"))
        assert resp.status_code == 200
        if resp.headers["x-tqstack-backend"] == "ollama":
            routed.append(time.monotonic())
        time.sleep(0.01)
    assert routed, "traffic never returned to Ollama"
    first = _first_generation_after(ollama, restarted)
    # the first successful health poll brings it back: no more than one poll in between
    assert _health_polls_between(ollama, restarted, first) == 1


def test_sidecar_returns_within_one_health_interval(rel_router, ollama, sidecar) -> None:
    # forced to the sidecar by prefix (a long prompt could be sent to it by context fit alone)
    r = rel_router(ollama.url, sidecar.url, health_interval_s=0.3)
    r.wait_for(lambda: r.backend_state("sidecar") == "up")
    sidecar.stop()
    r.wait_for(lambda: r.backend_state("sidecar") == "down")
    down = run_many_sync(r.url, mixed(10), concurrency=5, deadline_s=DEADLINE)
    assert down.counts["ok"] == 10 and down.backends == {"ollama": 10}, show(down)
    sidecar.journal.clear()
    restarted = time.monotonic()
    sidecar.start()
    deadline = restarted + 5
    while time.monotonic() < deadline:
        resp = r.client.post(CHAT, json=chat("hi", model="tq:auto"))
        assert resp.status_code == 200
        if resp.headers["x-tqstack-backend"] == "sidecar":
            break
        time.sleep(0.01)
    first = _first_generation_after(sidecar, restarted)
    assert first is not None, "traffic never returned to the sidecar"
    assert _health_polls_between(sidecar, restarted, first) == 1


def test_flapping_backend_during_a_run(rel_router, ollama, sidecar) -> None:
    """The sidecar goes down and up every ~0.15 s while 300 mixed requests run."""
    # slow enough that the run spans many flips (~3 s)
    sidecar.faults.update(chunk_delay_s=0.02, reply_tokens=8)
    ollama.faults.update(chunk_delay_s=0.02, reply_tokens=8)
    r = rel_router(
        ollama.url, sidecar.url, health_interval_s=0.1, upstream_read_timeout_s=READ_TIMEOUT
    )
    stop = threading.Event()
    flips = [0]

    def flap() -> None:
        while not stop.is_set():
            time.sleep(0.15)
            sidecar.stop() if sidecar.server.running else sidecar.start()
            flips[0] += 1
        sidecar.start()

    t = threading.Thread(target=flap)
    t.start()
    try:
        bodies = [
            (
                CHAT if i % 4 else "/v1/completions",
                chat("hi", model="tq:auto" if i % 3 else OLLAMA_MODEL, stream=i % 2 == 0)
                if i % 4
                else {"model": "tq:auto", "prompt": "hi", "stream": i % 2 == 0},
            )
            for i in range(300)
        ]
        tally = run_many_sync(r.url, bodies, concurrency=16, deadline_s=DEADLINE)
    finally:
        stop.set()
        t.join()
    s = show(tally)
    assert flips[0] >= 4, f"the backend flapped only {flips[0]} times: {s}"
    assert_clean(tally)
    # failures are the backends' (cut streams, a 503 with Retry-After when neither could take
    # a request), never the router's own; fallback covers the rest
    assert not any(k.startswith("router:") for k in tally.upstream_errors), s
    assert tally.counts["ok"] >= tally.counts["error"], s
    # (which backend answered depends on the flip timing; returning traffic to a backend
    # that is back is proven by the two tests above)
    r.wait_for(lambda: r.state.active_streams == 0)
