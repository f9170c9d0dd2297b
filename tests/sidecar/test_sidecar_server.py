"""The real sidecar process with the real SmolLM2-135M, driven over loopback HTTP.

One process per module (loading takes seconds). Prompts are short and answers a few
tokens: MLX on a 2-core CPU decodes ~10 tokens/s.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import stop_process
from tests.sidecar.harness import FRANCE, MAX_QUEUE, Sidecar, start_sidecar

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def sidecar(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    sc = start_sidecar(smollm2_dir, tmp_path_factory.mktemp("sidecar"))
    try:
        yield sc
    finally:
        stop_process(sc.proc)


def chat(sc: Sidecar, messages=FRANCE, **kw):
    kw.setdefault("temperature", 0)
    return sc.client().chat.completions.create(model="anything", messages=messages, **kw)


def wait_idle(sc: Sidecar, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = sc.health()
        if h["active_requests"] == 0 and h["queued_requests"] == 0:
            return h
        time.sleep(0.05)
    raise TimeoutError(f"sidecar still busy: {h}")


# ------------------------------------------------------------------ health and models


def test_health_is_503_loading_until_ready(sidecar: Sidecar) -> None:
    codes = [c for c, _ in sidecar.startup]
    assert codes[0] == 503, codes[:5]
    assert sidecar.startup[0][1]["status"] == "loading"
    chat_while_loading = sidecar.startup[1][1]
    assert codes[1] == 503 and chat_while_loading["retry"] is not None
    assert chat_while_loading["chat"]["error"]["code"] == "model_not_ready"
    assert codes[-1] == 200 and 503 not in codes[codes.index(200) :]
    h = sidecar.health()
    assert h["status"] == "ok"
    assert h["model"] == "smollm2-135m-instruct"
    assert h["architecture"] == "pure_sdpa"
    assert h["context_length"] == 8192
    assert isinstance(h["compressed_layers"], list)
    assert h["cache"]["kv_bytes_per_token_fp16"] == 30 * 2 * 3 * 64 * 2
    assert h["memory"]["mlx_active_bytes"] > 100_000_000  # 135M parameters in float32
    assert h["active_requests"] == 0 and h["queued_requests"] == 0


def test_models_lists_the_loaded_model(sidecar: Sidecar) -> None:
    data = httpx.get(sidecar.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["smollm2-135m-instruct"]
    assert data[0]["context_length"] == 8192
    assert [m.id for m in sidecar.client().models.list()] == ["smollm2-135m-instruct"]


# ------------------------------------------------------------------ generation


def test_non_stream_chat_answers_with_usage(sidecar: Sidecar) -> None:
    r = chat(sidecar, max_tokens=12)
    assert r.model == "smollm2-135m-instruct"  # whatever the request's model said
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_health_reports_the_decode_attention_path(sidecar: Sidecar) -> None:
    before = wait_idle(sidecar)["cache"]["decode"]
    r = chat(sidecar, max_tokens=6)
    h = wait_idle(sidecar)
    after = h["cache"]["decode"]
    # On this CPU MLX runs no CUDA kernel: every compressed layer decodes with MLX ops.
    assert before["path"] == after["path"] == "portable"
    assert after["calls"]["kernel"] == 0
    # one call per compressed layer and decode step (the first token comes from prefill)
    steps = r.usage.completion_tokens - 1
    assert steps >= 1 and len(h["compressed_layers"]) > 0
    grown = after["calls"]["portable"] - before["calls"]["portable"]
    assert grown >= steps * len(h["compressed_layers"])


def test_stream_matches_non_stream_and_reports_usage(sidecar: Sidecar) -> None:
    whole = chat(sidecar, max_tokens=10)
    chunks = list(chat(sidecar, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_wire_format(sidecar: Sidecar) -> None:
    body = {"messages": FRANCE, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", sidecar.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all("usage" not in p for p in payloads)  # no include_usage: no usage key
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["choices"][0]["delta"] == {}
    assert sum(1 for p in payloads if "role" in p["choices"][0]["delta"]) == 1


def test_max_tokens_and_max_completion_tokens(sidecar: Sidecar) -> None:
    r = chat(sidecar, max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = chat(sidecar, max_completion_tokens=2)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_stop_sequence_cuts_the_answer(sidecar: Sidecar) -> None:
    full = chat(sidecar, max_tokens=10).choices[0].message.content
    assert " of " in full, full
    r = chat(sidecar, max_tokens=10, stop=[" of ", "zzz"])
    assert r.choices[0].message.content == full[: full.index(" of ")]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 10


def test_seed_makes_sampling_repeatable(sidecar: Sidecar) -> None:
    msgs = [{"role": "user", "content": "Write a word."}]
    runs = [
        chat(sidecar, messages=msgs, temperature=1.0, seed=1234, max_tokens=8)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    others = {
        chat(sidecar, messages=msgs, temperature=1.5, seed=s, max_tokens=8)
        .choices[0]
        .message.content
        for s in (1, 2, 3)
    }
    assert len(others) > 1  # the seed really drives sampling


def test_text_completion_keeps_leading_space(sidecar: Sidecar) -> None:
    r = sidecar.client().completions.create(
        model="x", prompt="The capital of France is", max_tokens=3, temperature=0
    )
    assert r.object == "text_completion"
    assert r.choices[0].text.startswith(" Paris"), r.choices[0].text
    assert r.usage.completion_tokens == 3


# ------------------------------------------------------------------ prefix cache


def test_prefix_cache_reuse_gives_the_same_answer(sidecar: Sidecar) -> None:
    first = chat(sidecar, max_tokens=12)
    turn2 = FRANCE + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Italy?"},
    ]
    reused = chat(sidecar, messages=turn2, max_tokens=12)
    fresh = chat(sidecar, messages=turn2, max_tokens=12, extra_body={"cache_prompt": False})
    assert reused.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert reused.choices[0].message.content == fresh.choices[0].message.content
    # The same request again hits its own cached entry.
    again = chat(sidecar, messages=turn2, max_tokens=12)
    assert again.choices[0].message.content == fresh.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


# ------------------------------------------------------------------ limits and errors


def test_context_overflow_is_400_with_numbers(sidecar: Sidecar) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(sidecar, max_tokens=9000)
    err = e.value.body
    assert e.value.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "8192" in err["message"] and "9000" in err["message"]
    long = [{"role": "user", "content": "hello " * 9000}]
    with pytest.raises(openai.BadRequestError) as e:
        chat(sidecar, messages=long)
    assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": FRANCE, "temperature": "hot"}, "temperature"),
        ({"messages": FRANCE, "max_tokens": "many"}, "max_tokens"),
        ({"messages": FRANCE, "stream": "yes"}, "stream"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"messages": FRANCE, "top_p": 3}, "top_p"),
        ({"messages": FRANCE, "n": 2}, "n"),
        ({"messages": FRANCE, "stop": [""]}, "stop"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
    ],
)
def test_bad_fields_are_400(sidecar: Sidecar, body: dict, param: str) -> None:
    r = httpx.post(sidecar.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_bad_json_and_unknown_fields(sidecar: Sidecar) -> None:
    r = httpx.post(sidecar.url + "/v1/chat/completions", content=b"{nope", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        sidecar.url + "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 1, "some_future_field": {"x": 1}},
    )
    assert r.status_code == 200


# ------------------------------------------------------------------ cancellation and queue


def test_disconnect_stops_generation(sidecar: Sidecar) -> None:
    before = sidecar.health()["counters"]["cancelled"]
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", sidecar.url + "/v1/chat/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                got += 1
            if got >= 3:
                # Still connected: the job is running. (Leaving the loop drops the connection.)
                busy = sidecar.health()
                break
        assert busy["active_requests"] == 1
    t0 = time.monotonic()
    h = wait_idle(sidecar, timeout=20)
    assert time.monotonic() - t0 < 5  # 400 tokens would take far longer
    assert h["counters"]["cancelled"] == before + 1


def test_queue_overflow_is_429_with_retry_after(sidecar: Sidecar) -> None:
    body = {
        "messages": [{"role": "user", "content": "Count to fifty."}],
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    stop = threading.Event()
    started = []

    def hold() -> None:
        with httpx.stream("POST", sidecar.url + "/v1/chat/completions", json=body, timeout=60) as r:
            started.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hold) for _ in range(1 + MAX_QUEUE)]
    try:
        for t in threads:
            t.start()
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            h = sidecar.health()
            if h["active_requests"] + h["queued_requests"] == 1 + MAX_QUEUE:
                break
            time.sleep(0.05)
        assert h["queued_requests"] == MAX_QUEUE
        assert h["requests"][0]["state"] in ("prefill", "decode")
        assert h["requests"][0]["kv_actual_bytes"] >= 0
        r = httpx.post(
            sidecar.url + "/v1/chat/completions",
            timeout=10,
            json={"messages": FRANCE, "max_tokens": 1},
        )
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            chat(sidecar, max_tokens=1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert started == [200] * (1 + MAX_QUEUE)
    wait_idle(sidecar, timeout=20)
    assert "Paris" in chat(sidecar, max_tokens=8).choices[0].message.content


def test_keepalive_comments_during_prompt_processing(sidecar: Sidecar) -> None:
    # A few hundred prompt tokens take well over the 0.2 s keepalive interval on this CPU.
    prompt = "Summarise: " + "The quick brown fox jumps over the lazy dog. " * 60
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
        "cache_prompt": False,
    }
    with httpx.stream("POST", sidecar.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    data = [i for i, ln in enumerate(lines) if ln.startswith("data: ")]
    assert '"role"' in lines[data[0]]
    # Comments between the role chunk and the first generated token.
    between = lines[data[0] + 1 : data[1]]
    assert between and all(ln.startswith(": keepalive") for ln in between), lines[:5]
    assert lines[-1] == "data: [DONE]"


def test_logs_hold_no_request_content(sidecar: Sidecar) -> None:
    secret = "zebra-marmalade-7731"
    chat(sidecar, messages=[{"role": "user", "content": f"Say {secret}"}], max_tokens=2)
    assert secret not in sidecar.log.read_text()


def test_non_stream_client_gone_stops_generation(sidecar: Sidecar) -> None:
    before = sidecar.health()["counters"]["cancelled"]
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "temperature": 0,
    }
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(
            sidecar.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=2.0)
        )
    t0 = time.monotonic()
    h = wait_idle(sidecar, timeout=20)
    assert time.monotonic() - t0 < 5
    assert h["counters"]["cancelled"] == before + 1


def test_penalties_change_the_answer_and_survive_prefix_reuse(sidecar: Sidecar) -> None:
    # Its own system prompt: no other test's cached conversation shares a usable prefix.
    msgs = [
        {"role": "system", "content": "Penalties."},
        {"role": "user", "content": "Say the word cat ten times."},
    ]

    def say(reuse: bool, **kw) -> str:
        extra = kw.pop("extra_body", {})
        extra["cache_prompt"] = reuse
        r = chat(sidecar, messages=msgs, max_tokens=10, extra_body=extra, **kw)
        return r.choices[0].message.content

    plain = say(False)
    penalised = say(False, extra_body={"repetition_penalty": 1.8})
    assert penalised != plain
    chat(sidecar, messages=msgs, max_tokens=1)  # leave this prompt in the prefix cache
    # With the prompt reused from the cache the penalty still sees the prompt's tokens.
    assert say(True, extra_body={"repetition_penalty": 1.8}) == penalised
    freq = say(False, frequency_penalty=1.5)
    assert freq != plain
    assert say(True, frequency_penalty=1.5) == freq
