"""The real sidecar (SmolLM2-135M, MLX) behind the router: disconnects stop generation at
once, fuzzed and badly typed requests never crash or wedge it.

One sidecar process for the module, started with the sidecar tests' own helper.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import stop_process
from tests.sidecar.harness import Sidecar, start_sidecar
from tests.sidecar.test_sidecar_server import wait_idle

from .outcome import classify_json, classify_sse, envelope_component
from .test_bad_input import NOT_HTTP, assert_enveloped_400, raw_http
from .test_disconnects import open_and_drop

pytestmark = [pytest.mark.model, pytest.mark.slow]

STORY = [{"role": "user", "content": "Tell me a very long story about a dragon."}]


@pytest.fixture(scope="module")
def real_sidecar(smollm2_dir: Path, tmp_path_factory) -> Iterator[Sidecar]:
    sc = start_sidecar(smollm2_dir, tmp_path_factory.mktemp("rel-sidecar"))
    try:
        yield sc
    finally:
        stop_process(sc.proc)


def test_the_sidecar_process_answers_non_http_bytes_in_the_openai_envelope(
    real_sidecar: Sidecar,
) -> None:
    port = int(real_sidecar.url.rsplit(":", 1)[1])
    for junk in NOT_HTTP:
        assert_enveloped_400(raw_http(port, junk), "sidecar")
    assert httpx.get(real_sidecar.url + "/health").status_code == 200


def cancelled_lengths(log: Path) -> list[int]:
    """Completion token counts of the cancelled jobs, from the sidecar's own log lines."""
    return [int(m) for m in re.findall(r"completion=(\d+) finish=cancelled", log.read_text())]


def test_disconnect_through_the_router_stops_generation_within_one_token(
    real_sidecar: Sidecar, make_router, ollama
) -> None:
    """A client leaves mid-stream; the sidecar's job ends no more than a token later."""
    r = make_router(ollama.url, real_sidecar.url, upstream_read_timeout_s=120.0)
    r.wait_for(lambda: r.backend_state("sidecar") == "up", timeout=10)
    body = {
        "model": "tq:auto",
        "messages": STORY,
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    overruns = []
    for _ in range(3):
        before = len(cancelled_lengths(real_sidecar.log))
        seen: list[int] = []

        async def leave(seen: list[int] = seen) -> None:
            # read 4 events, look at the job's token count, then drop the socket at once
            await open_and_drop(
                r.server.port,
                body,
                4,
                before_drop=lambda: seen.append(
                    real_sidecar.health()["requests"][0]["completion_tokens"]
                ),
            )

        asyncio.run(leave())
        wait_idle(real_sidecar, timeout=30)
        deadline = time.monotonic() + 5
        while len(cancelled_lengths(real_sidecar.log)) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        final = cancelled_lengths(real_sidecar.log)[before]
        overruns.append(final - seen[0])
    print(f"tokens generated after the look, per disconnect: {overruns}")
    # one token may land between the look and the drop; one more is in flight when the cancel
    # is seen (the engine checks after every token): anything more would be a leak of work
    assert all(0 <= o <= 2 for o in overruns), overruns
    r.wait_for(lambda: r.state.active_streams == 0)


BAD = [
    {"messages": STORY, "max_tokens": "lots"},
    {"messages": STORY, "stream": "yes"},
    {"messages": [{"role": 5, "content": []}]},
    {"messages": STORY, "temperature": None, "top_p": [1]},
    {"messages": STORY, "stop": {"a": 1}},
    {"messages": STORY, "logit_bias": {"1": "x"}},
    {"messages": STORY, "max_tokens": 10**30},
    {"prompt": {"x": 1}},
    {},
]


def test_badly_typed_requests_in_parallel_never_drop_or_wedge_it(real_sidecar: Sidecar) -> None:
    """mlx-lm's server drops the connection on bad types and wedges under concurrency."""

    async def send_all() -> list[tuple[int, bytes]]:
        async with httpx.AsyncClient(base_url=real_sidecar.url, timeout=60) as c:

            async def one(body: dict) -> tuple[int, bytes]:
                path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
                r = await c.post(path, json={"max_tokens": 2, **body})
                return r.status_code, r.content

            return await asyncio.gather(*(one(b) for b in BAD * 2))

    for body, (status, content) in zip(BAD * 2, asyncio.run(send_all()), strict=True):
        assert 400 <= status < 500, (body, status, content[:300])
        assert envelope_component(json.loads(content)) == (True, "sidecar"), content[:300]
    wait_idle(real_sidecar)
    ok = httpx.post(
        real_sidecar.url + "/v1/chat/completions",
        timeout=60,
        json={"messages": STORY, "max_tokens": 2, "temperature": 0},
    )
    assert ok.status_code == 200, ok.text


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, json_values)


message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "user", "assistant"]))},
    optional={"content": maybe(st.text(max_size=20))},
)
# Always a tiny budget or a bad one: the fuzzing is about the schema, not about decoding. Not
# null: that is a valid budget ("up to the context limit"), which a rambling answer took 1,400
# tokens and the client's 2-minute timeout to spend on a CPU, example after example.
budget = st.one_of(
    st.integers(1, 2), st.integers(1, 2), json_values.filter(lambda v: v is not None)
)
sidecar_bodies = st.fixed_dictionaries(
    {"max_tokens": budget, "messages": maybe(st.lists(message, max_size=2))},
    optional={
        "stream": maybe(st.booleans()),
        "temperature": maybe(st.floats(0, 2)),
        "top_p": maybe(st.floats(0.01, 1)),
        "top_k": maybe(st.integers(0, 50)),
        "stop": maybe(st.text(min_size=1, max_size=4)),
        "seed": maybe(st.integers(0, 2**31)),
        "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "n": json_values,
        "unknown": json_values,
    },
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=sidecar_bodies)
def test_fuzzed_sidecar_requests(real_sidecar: Sidecar, body: dict) -> None:
    r = httpx.post(real_sidecar.url + "/v1/chat/completions", json=body, timeout=120)
    if r.status_code == 200:
        out = (
            classify_sse(r.content) if body.get("stream") is True else classify_json(200, r.content)
        )
        assert out.kind == "ok", (out, r.content[:300])
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert envelope_component(r.json()) == (True, "sidecar"), r.text[:300]
