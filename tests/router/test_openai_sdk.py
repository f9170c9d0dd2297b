"""The OpenAI Python SDK as the client: stream, non-stream, tool-call deltas, errors."""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import OLLAMA_MODEL, SIDECAR_MODEL

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MSG = [{"role": "user", "content": "Say hello"}]


def client(router, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{router.url}/v1",
        api_key=kw.pop("api_key", "local"),
        max_retries=0,
        timeout=20,
        **kw,
    )


@pytest.mark.parametrize("model", [OLLAMA_MODEL, "tq:auto"])
def test_non_stream(router, model: str) -> None:
    raw = client(router).chat.completions.with_raw_response.create(model=model, messages=MSG)
    r = raw.parse()
    assert r.choices[0].message.content == "Hello from the fake"
    assert r.usage.total_tokens > 0
    assert raw.headers["x-request-id"] == raw.request_id  # the SDK's request id is ours
    assert raw.headers["x-tqstack-backend"] == ("sidecar" if model.startswith("tq:") else "ollama")


@pytest.mark.parametrize("model", [OLLAMA_MODEL, "tq:auto"])
def test_stream_with_usage(router, model: str) -> None:
    chunks = list(
        client(router).chat.completions.create(
            model=model, messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].choices == []


@pytest.mark.parametrize("model", [OLLAMA_MODEL, "tq:auto"])
def test_tool_call_deltas(router, model: str) -> None:
    chunks = list(
        client(router).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=TOOLS,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    args = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(args) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_non_stream_tool_call(router) -> None:
    r = client(router).chat.completions.create(model="tq:auto", messages=MSG, tools=TOOLS)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_error_mapping(router) -> None:
    c = client(router)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="ollama:missing:7b", messages=MSG)
    assert e.value.code == "model_not_found" and e.value.body["component"] == "ollama"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=OLLAMA_MODEL, messages=[])
    assert e.value.param == "messages"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="tq:not-" + SIDECAR_MODEL, messages=MSG)


def test_auth_error(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, tqstack_api_key="k")
    with pytest.raises(openai.AuthenticationError):
        client(router, api_key="wrong").chat.completions.create(model="auto", messages=MSG)
    r = client(router, api_key="k").chat.completions.create(model="auto", messages=MSG)
    assert r.choices[0].message.content


def test_midstream_failure_raises_in_sdk(router, ollama) -> None:
    ollama.faults.update(die_after_chunks=2)
    stream = client(router).chat.completions.create(model=OLLAMA_MODEL, messages=MSG, stream=True)
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 2 and "ollama" in str(e.value.message)


def test_models_list(router) -> None:
    ids = [m.id for m in client(router).models.list()]
    assert f"tq:{SIDECAR_MODEL}" in ids and f"ollama:{OLLAMA_MODEL}" in ids
    assert client(router).models.retrieve(f"ollama:{OLLAMA_MODEL}").id == f"ollama:{OLLAMA_MODEL}"


def test_legacy_completions(router) -> None:
    r = client(router).completions.create(model="tq:auto", prompt="Once upon")
    assert r.choices[0].text == "Hello from the fake"


def test_embeddings(router) -> None:
    r = client(router).embeddings.create(model="ollama:llama3.2:1b", input="hi")
    assert len(r.data) == 1 and len(r.data[0].embedding) == 3
