"""Property-based fuzzing of the router's request schemas (hypothesis).

Bodies are built field by field from a mix of valid values and arbitrary JSON, plus raw
bytes. Properties: the router never answers 5xx itself, every error is an OpenAI envelope,
a request it refuses never reaches a backend, and every 200 is a well-formed answer. The
pure validation + token estimate pair is fuzzed directly with many more examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.errors import APIError
from services.router import routing
from services.router.app import create_app
from services.router.validate import check_chat, check_completion
from tests.upstreams import FakeOllama, FakeSidecar, UpstreamServer

from .conftest import OLLAMA_MODEL, router_settings
from .outcome import classify_json, classify_sse, envelope_component

# --- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a valid value, sometimes anything at all."""
    return st.one_of(valid, valid, json_values)


roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])
parts = st.fixed_dictionaries(
    {"type": maybe(st.sampled_from(["text", "image_url"]))},
    optional={"text": maybe(st.text(max_size=20)), "image_url": json_values},
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": maybe(roles)},
        optional={
            "content": maybe(st.text(max_size=40) | st.lists(parts, max_size=3)),
            "name": maybe(st.text(max_size=8)),
            "tool_calls": maybe(st.lists(json_values, max_size=2)),
            "tool_call_id": json_values,
        },
    )
    | json_values,
    max_size=4,
)
models = st.sampled_from(
    [OLLAMA_MODEL, "tq:auto", "ollama:" + OLLAMA_MODEL, "auto", "sidecar:", "local:", "x"]
) | st.text(max_size=16)
common = {
    "stream": maybe(st.booleans()),
    "max_tokens": maybe(st.integers(min_value=-5, max_value=10**12)),
    "max_completion_tokens": maybe(st.integers(min_value=-5, max_value=64)),
    "temperature": maybe(st.floats(0, 2)),
    "top_p": maybe(st.floats(0, 1)),
    "stop": json_values,
    "seed": json_values,
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "unknown_field": json_values,
}
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": maybe(models),
        "messages": maybe(messages),
        "tools": maybe(st.lists(json_values, max_size=2)),
        "tool_choice": json_values,
        **common,
    },
)
completion_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": maybe(models),
        "prompt": maybe(st.text(max_size=30) | st.lists(st.text(max_size=5) | st.integers(0, 9))),
        **common,
    },
)


# --- the pure pair: validation, then the estimate the router runs on what passed


@settings(max_examples=250, deadline=None)
@given(body=chat_bodies)
def test_check_chat_then_estimate_never_crashes(body: dict) -> None:
    try:
        check_chat(body)
    except APIError as e:
        assert e.status == 400 and e.component == "router"
        return
    assert routing.estimate_chat_tokens(body["messages"], body.get("tools")) >= 0


@settings(max_examples=150, deadline=None)
@given(body=completion_bodies)
def test_check_completion_then_estimate_never_crashes(body: dict) -> None:
    try:
        check_completion(body)
    except APIError as e:
        assert e.status == 400 and e.component == "router"
        return
    assert routing.estimate_completion_tokens(body["prompt"]) >= 0


# --- over HTTP, through the running router


class Stack:
    def __init__(self) -> None:
        self.ollama = FakeOllama().start()
        self.sidecar = FakeSidecar().start()
        app = create_app(router_settings(self.ollama.url, self.sidecar.url))
        self.server = UpstreamServer(app, lifespan="on").start()
        self.client = httpx.Client(base_url=self.server.url, timeout=20)

    def generations(self) -> int:
        return len(self.ollama.journal.generations()) + len(self.sidecar.journal.generations())


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    yield s
    s.client.close()
    s.server.stop()
    s.ollama.stop()
    s.sidecar.stop()


def check_answer(stack: Stack, path: str, content: bytes, stream: bool) -> None:
    before = stack.generations()
    with stack.client.stream(
        "POST", path, content=content, headers={"content-type": "application/json"}
    ) as r:
        data = r.read()
    if r.status_code == 200:
        out = classify_sse(data) if stream else classify_json(200, data)
        # a 200 stream may still end in a backend's error event (the fakes' own limits)
        assert out.kind in ("ok", "error"), (out, data[:300])
        assert out.kind == "ok" or out.component in ("ollama", "sidecar")
        return
    ok, comp = envelope_component(json.loads(data))
    assert ok, data[:300]
    assert r.status_code < 500 or comp != "router", data[:300]
    if comp == "router" and 400 <= r.status_code < 500:
        assert stack.generations() == before, "a request the router refused reached a backend"


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=chat_bodies)
def test_fuzzed_chat_bodies(stack: Stack, body: dict) -> None:
    check_answer(
        stack, "/v1/chat/completions", json.dumps(body).encode(), body.get("stream") is True
    )


@FUZZ
@given(body=completion_bodies)
def test_fuzzed_completion_bodies(stack: Stack, body: dict) -> None:
    check_answer(stack, "/v1/completions", json.dumps(body).encode(), body.get("stream") is True)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=256) | st.text(max_size=64).map(str.encode))
def test_fuzzed_raw_bytes(stack: Stack, raw: bytes) -> None:
    check_answer(stack, "/v1/chat/completions", raw, False)
