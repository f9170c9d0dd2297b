"""The router over real loopback HTTP, in front of the fake Ollama and fake sidecar."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx

from tests.upstreams import FakeSidecar, free_port

from .conftest import OLLAMA_MODEL, SIDECAR_MODEL, chat, sse_events

LONG = "word " * 6000  # ~7500 tokens: over the pure-SDPA threshold


# --- relay and headers


def test_non_stream_relay_is_the_backend_answer(router, ollama) -> None:
    r = router.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    body = r.json()
    assert body["system_fingerprint"] == "fp_ollama"
    assert body["choices"][0]["message"]["content"] == "Hello from the fake"
    assert r.headers["x-tqstack-backend"] == "ollama"
    assert r.headers["x-tqstack-route"] == "auto-short"
    assert ollama.journal.generations()[-1].body["model"] == OLLAMA_MODEL


def _norm(text: str) -> str:
    return re.sub(r'"(id|created)":("[^"]*"|\d+)', r'"\1":_', text)


def test_stream_relay_is_byte_for_byte(router, ollama) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    direct = httpx.post(f"{ollama.url}/v1/chat/completions", json=body).text
    with router.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        relayed = r.read().decode()
        headers = r.headers
    assert _norm(relayed) == _norm(direct)  # only per-call ids and timestamps differ
    events = sse_events(relayed)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"] == []  # the usage chunk survived
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert "content-length" not in headers and "content-encoding" not in headers
    assert ollama.journal.generations()[-1].body["stream_options"] == {"include_usage": True}


def test_request_ids_unique_even_though_ollama_ids_repeat(router) -> None:
    ids = {
        router.client.post("/v1/chat/completions", json=chat()).headers["x-request-id"]
        for _ in range(5)
    }
    assert len(ids) == 5
    assert router.client.get("/health").headers["x-request-id"] not in ids


def test_completions_endpoint_stream_and_not(router, sidecar) -> None:
    r = router.client.post("/v1/completions", json={"model": "tq:auto", "prompt": "Once"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello from the fake"
    assert r.headers["x-tqstack-backend"] == "sidecar"
    with router.client.stream(
        "POST", "/v1/completions", json={"model": "tq:auto", "prompt": "Once", "stream": True}
    ) as s:
        assert sse_events(s.read().decode())[-1] == "[DONE]"
    assert sidecar.journal.generations()[-1].body["model"] == SIDECAR_MODEL


# --- routing


def test_long_prompt_goes_to_sidecar_with_exact_model(router, sidecar) -> None:
    r = router.client.post("/v1/chat/completions", json=chat(LONG))
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == (
        "sidecar",
        "auto-long",
    )
    assert sidecar.journal.generations()[-1].body["model"] == SIDECAR_MODEL


def test_hybrid_sidecar_threshold_learned_from_health(make_router, ollama) -> None:
    with FakeSidecar(architecture="hybrid") as hybrid:
        router = make_router(ollama.url, hybrid.url)
        h = router.client.get("/health").json()
        assert (h["prompt_token_threshold"], h["threshold_source"]) == (16000, "sidecar:hybrid")
        assert h["sidecar_architecture"] == "hybrid"
        r = router.client.post("/v1/chat/completions", json=chat(LONG))
        assert r.headers["x-tqstack-backend"] == "ollama"
        r = router.client.post("/v1/chat/completions", json=chat(LONG * 3))
        assert r.headers["x-tqstack-backend"] == "sidecar"


def test_numeric_threshold_overrides(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, prompt_token_threshold=10)
    assert router.client.get("/health").json()["threshold_source"] == "config"
    r = router.client.post("/v1/chat/completions", json=chat("x" * 100))
    assert r.headers["x-tqstack-backend"] == "sidecar"


def test_prefixes_force_backends(router, ollama) -> None:
    r = router.client.post("/v1/chat/completions", json=chat(model="local:llama3.2:1b"))
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == ("ollama", "prefix")
    assert ollama.journal.generations()[-1].body["model"] == "llama3.2:1b"
    for prefix in ("tq:", "turbo:", "sidecar:"):
        r = router.client.post("/v1/chat/completions", json=chat(model=prefix + "auto"))
        assert r.headers["x-tqstack-backend"] == "sidecar"
    r = router.client.post("/v1/chat/completions", json=chat(model=SIDECAR_MODEL))
    assert r.headers["x-tqstack-backend"] == "sidecar"  # the sidecar's bare id names it


def test_prompt_that_ollama_would_truncate_goes_to_sidecar(router, ollama) -> None:
    # once loaded, Ollama runs the model with num_ctx 4096 (seen in /api/ps)
    router.client.post("/v1/chat/completions", json=chat())
    router.wait_for(
        lambda: (
            router.client.get("/health").json()["context_lengths"]["ollama"].get(OLLAMA_MODEL)
            == 4096
        )
    )
    r = router.client.post("/v1/chat/completions", json=chat("x" * 16000))  # ~4000 + 10
    assert r.status_code == 200
    assert r.headers["x-tqstack-route"] == "auto-short"
    r = router.client.post("/v1/chat/completions", json=chat("x" * 16000, max_tokens=500))
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == ("sidecar", "context")
    r = router.client.post("/v1/chat/completions", json=chat("x" * 16000, max_tokens=40000))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


# --- health and fallback


def test_health_reports_both_backends(router) -> None:
    h = router.client.get("/health").json()
    assert h["status"] == "ok" and h["sidecar_available"] is True
    for name in ("ollama", "sidecar"):
        b = h["backends"][name]
        assert b["state"] == "up" and b["consecutive_failures"] == 0
        assert b["latency_ms"] is not None and b["last_check"] > 0
    assert h["sidecar_architecture"] == "pure_sdpa" and h["prompt_token_threshold"] == 6000
    assert h["context_lengths"]["sidecar"] == 32768


def test_ollama_down_at_start_falls_back_to_sidecar(make_router, sidecar) -> None:
    router = make_router(f"http://127.0.0.1:{free_port()}", sidecar.url)
    h = router.client.get("/health").json()
    assert h["backends"]["ollama"]["state"] == "down" and h["status"] == "degraded"
    r = router.client.post("/v1/chat/completions", json=chat(stream=True))
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == ("sidecar", "fallback")
    assert sse_events(r.text)[-1] == "[DONE]"


def test_sidecar_down_falls_back_to_ollama_and_recovers(make_router, ollama) -> None:
    port = free_port()
    fake = FakeSidecar(port)
    router = make_router(ollama.url, fake.url)
    assert router.backend_state("sidecar") == "down"
    r = router.client.post("/v1/chat/completions", json=chat(LONG))
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == ("ollama", "fallback")
    with fake:
        router.wait_for(lambda: router.backend_state("sidecar") == "up")
        r = router.client.post("/v1/chat/completions", json=chat(LONG))
        assert r.headers["x-tqstack-backend"] == "sidecar"


def test_backend_dying_between_checks_falls_back_before_first_byte(
    make_router, ollama, sidecar
) -> None:
    router = make_router(ollama.url, sidecar.url, health_interval_s=30)
    assert router.backend_state("ollama") == "up"
    ollama.stop()  # health has not noticed yet: the request itself meets the refusal
    r = router.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == ("sidecar", "fallback")
    assert router.backend_state("ollama") == "down"
    m = router.client.get("/metrics").text
    assert (
        'tqstack_router_fallbacks_total{cause="connect",from_backend="ollama",to_backend="sidecar"} 1.0'
        in m
    )


def test_connection_closed_before_answer_falls_back(router, ollama) -> None:
    ollama.faults.update(close_without_response=True)
    r = router.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.headers["x-tqstack-backend"] == "sidecar"


def test_sidecar_loading_is_not_available(make_router, ollama) -> None:
    with FakeSidecar(loading=True) as loading:
        router = make_router(ollama.url, loading.url)
        h = router.client.get("/health").json()
        assert h["sidecar_available"] is False
        assert h["backends"]["sidecar"]["status"] == "loading"
        r = router.client.post("/v1/chat/completions", json=chat(model="tq:auto"))
        assert r.headers["x-tqstack-route"] == "fallback"
        loading.loading = False
        router.wait_for(lambda: router.client.get("/health").json()["sidecar_available"])


def test_sidecar_answering_503_falls_back_before_any_work(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, health_interval_s=30)
    sidecar.loading = True  # health has not seen it: the request meets the 503
    r = router.client.post("/v1/chat/completions", json=chat(model="tq:auto"))
    assert r.status_code == 200
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == ("ollama", "fallback")


def test_queue_full_429_passes_retry_after(router, sidecar) -> None:
    sidecar.faults.update(error_status=429, error_message="queue full")
    r = router.client.post("/v1/chat/completions", json=chat(model="tq:auto"))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["component"] == "sidecar"


def test_alternate_marked_down_is_still_tried_before_a_503(make_router, ollama) -> None:
    # The sidecar comes back between health polls while Ollama dies: the request must not
    # get a 503 just because health has not seen the sidecar return yet.
    fake = FakeSidecar(free_port())
    router = make_router(ollama.url, fake.url, health_interval_s=30)
    assert router.backend_state("sidecar") == "down"
    with fake:
        ollama.stop()
        r = router.client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200
        assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == (
            "sidecar",
            "fallback",
        )


def test_both_down_is_503(make_router) -> None:
    router = make_router(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    h = router.client.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "down"
    r = router.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and r.headers["x-should-retry"] == "true"
    assert r.json()["error"]["code"] == "backend_unavailable"


# --- failures after the first byte


def _stream(router, body):
    with router.client.stream("POST", "/v1/chat/completions", json=body) as r:
        return r.status_code, r.read().decode()


def _last_error(text: str) -> dict:
    events = sse_events(text)
    assert events and events[-1] != "[DONE]"
    return json.loads(events[-1])["error"]


def test_backend_dying_mid_stream_ends_with_error_event(router, ollama) -> None:
    ollama.faults.update(die_after_chunks=2)
    status, text = _stream(router, chat(stream=True))
    assert status == 200
    assert len(sse_events(text)) == 3  # two relayed chunks, then the error
    err = _last_error(text)
    assert err["component"] == "ollama" and "mid-stream" in err["message"]


def test_hang_after_headers_times_out_before_first_byte(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, upstream_read_timeout_s=0.5)
    ollama.faults.update(hang_after_headers=True)
    t0 = time.monotonic()
    r = router.client.post("/v1/chat/completions", json=chat(stream=True))
    assert time.monotonic() - t0 < 5
    assert r.status_code == 504 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["component"] == "ollama"


def test_hang_mid_stream_becomes_error_event(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, upstream_read_timeout_s=0.5)
    ollama.faults.update(hang_after_chunks=1)
    status, text = _stream(router, chat(stream=True))
    assert status == 200
    assert _last_error(text)["code"] == "upstream_timeout"


def test_garbage_sse_becomes_error_event(router, ollama) -> None:
    ollama.faults.update(garbage_sse=True)
    _, text = _stream(router, chat(stream=True))
    assert "not server-sent events" not in text
    assert "not SSE" in _last_error(text)["message"]


def test_silent_end_is_reported_not_hidden(router, ollama) -> None:
    ollama.faults.update(silent_end_after_chunks=2)  # Ollama's /v1 loses mid-stream errors
    _, text = _stream(router, chat(stream=True))
    assert "before completion" in _last_error(text)["message"]


def test_upstream_error_event_is_passed_once(router, sidecar) -> None:
    sidecar.faults.update(error_event_after_chunks=2, error_message="out of KV budget")
    _, text = _stream(router, chat(model="tq:auto", stream=True))
    errors = [e for e in sse_events(text) if e.startswith('{"error"')]
    assert len(errors) == 1 and "out of KV budget" in errors[0]


def _send_stream_request(s: socket.socket) -> None:
    """A streamed chat request on a raw socket, so the test controls when it is closed."""
    body = json.dumps(chat(stream=True)).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def test_client_disconnect_closes_upstream_within_a_second(router, ollama) -> None:
    ollama.faults.update(hang_after_chunks=2)
    with socket.create_connection(("127.0.0.1", router.server.port)) as s:
        _send_stream_request(s)
        got = b""
        while got.count(b"data:") < 2:
            got += s.recv(65536)
        assert ollama.journal.active_streams == 1
        s.shutdown(socket.SHUT_RDWR)
    closed = time.monotonic()
    deadline = closed + 3
    while not ollama.journal.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ollama.journal.disconnects, "upstream never saw the disconnect"
    assert ollama.journal.disconnects[0] - closed < 1.0
    router.wait_for(lambda: router.client.get("/health").json()["active_streams"] == 0)


def test_client_disconnect_before_first_byte_cancels_upstream(router, ollama) -> None:
    ollama.faults.update(hang_after_headers=True)
    with socket.create_connection(("127.0.0.1", router.server.port)) as s:
        _send_stream_request(s)
        router.wait_for(lambda: ollama.journal.active_streams == 1)
    closed = time.monotonic()
    router.wait_for(lambda: bool(ollama.journal.disconnects), timeout=3)
    assert ollama.journal.disconnects[0] - closed < 1.0


# --- normalisation and errors from backends


def test_normalisation_for_ollama(router, ollama) -> None:
    body = chat(max_completion_tokens=2, tools=[], tool_choice="auto")
    r = router.client.post("/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["finish_reason"] == "length"  # the limit reached Ollama
    sent = ollama.journal.generations()[-1].body
    assert sent["max_tokens"] == 2 and "max_completion_tokens" not in sent
    assert "tools" not in sent and "tool_choice" not in sent


def test_client_credentials_and_hop_headers_not_forwarded(router, ollama) -> None:
    router.client.post(
        "/v1/chat/completions",
        json=chat(),
        headers={
            "Authorization": "Bearer sk-secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "x",
            "Cookie": "a=b",
        },
    )
    sent = ollama.journal.generations()[-1].headers
    for h in ("authorization", "keep-alive", "te", "proxy-authorization", "cookie"):
        assert h not in sent
    assert sent["x-request-id"].startswith("req_")


def test_ollama_model_not_found(router) -> None:
    r = router.client.post("/v1/chat/completions", json=chat(model="ollama:nope:1b"))
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["component"] == "ollama" and err["code"] == "model_not_found"
    assert r.headers["x-tqstack-backend"] == "ollama"


def test_sidecar_mlx_style_error_is_rewritten(make_router, ollama) -> None:
    with FakeSidecar(mlx_errors=True) as bad:
        bad.faults.update(error_status=500, error_message="kv cache exploded")
        router = make_router(ollama.url, bad.url)
        r = router.client.post("/v1/chat/completions", json=chat(model="tq:auto"))
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["component"] == "sidecar" and "kv cache exploded" in err["message"]
    assert err["type"] == "server_error"


def test_busy_backend_503_falls_back_then_says_retry(router, ollama, sidecar) -> None:
    ollama.faults.update(error_status=503, error_message="server busy")
    r = router.client.post("/v1/chat/completions", json=chat())
    assert (r.status_code, r.headers["x-tqstack-route"]) == (200, "fallback")
    sidecar.faults.update(error_status=503, error_message="busy too")
    r = router.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.headers["x-should-retry"] == "true"
    assert r.json()["error"]["component"] == "sidecar"


# --- bad input


def test_bad_input_is_openai_400(router) -> None:
    cases = [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"", "invalid_json"),
        (json.dumps({"model": "m"}).encode(), "missing_required_parameter"),
        (json.dumps({"model": "m", "messages": []}).encode(), "invalid_value"),
        (json.dumps({"model": "m", "messages": "hi"}).encode(), "invalid_value"),
        (
            json.dumps({"model": 3, "messages": [{"role": "user", "content": "x"}]}).encode(),
            "invalid_value",
        ),
        (
            json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            "invalid_value",
        ),
        (json.dumps(chat(stream="yes")).encode(), "invalid_value"),
        (json.dumps(chat(max_tokens=-1)).encode(), "invalid_value"),
        (
            json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
            "missing_required_parameter",
        ),
    ]
    for raw, code in cases:
        r = router.client.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, raw
        err = r.json()["error"]
        assert err["code"] == code and err["type"] == "invalid_request_error", raw
        assert err["message"] and err["component"] == "router"
        assert r.headers["x-should-retry"] == "false"
        assert r.headers["x-request-id"].startswith("req_")


def test_unknown_sidecar_target_is_404(router) -> None:
    r = router.client.post("/v1/chat/completions", json=chat(model="tq:some-other-model"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert SIDECAR_MODEL in r.json()["error"]["message"]


def test_body_over_limit_is_413(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, max_request_bytes=1000)
    r = router.client.post("/v1/chat/completions", json=chat("x" * 2000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        yield b"x" * 2000
        yield b'"}]}'

    r = router.client.post("/v1/chat/completions", content=chunked())
    assert r.status_code == 413
    assert not ollama.journal.generations()


def test_unknown_path_and_method_are_openai_errors(router) -> None:
    r = router.client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = router.client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# --- auth


def test_api_key_required_when_set(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, tqstack_api_key="s3cret")
    assert router.client.get("/health").status_code == 200  # monitors need no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = router.client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert router.client.get("/v1/models").status_code == 401
    ok = router.client.post(
        "/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200
    assert "authorization" not in ollama.journal.generations()[-1].headers


# --- models and metrics


def test_models_merged_with_prefixes(router) -> None:
    data = router.client.get("/v1/models").json()["data"]
    ids = {d["id"] for d in data}
    assert f"tq:{SIDECAR_MODEL}" in ids
    assert f"ollama:{OLLAMA_MODEL}" in ids and OLLAMA_MODEL in ids
    assert "ollama:llama3.2:1b" in ids and "auto" in ids
    assert all(d["object"] == "model" for d in data)
    one = router.client.get(f"/v1/models/tq:{SIDECAR_MODEL}")
    assert one.status_code == 200 and one.json()["context_length"] == 32768
    assert router.client.get("/v1/models/ollama:llama3.2:1b").json()["backend"] == "ollama"
    missing = router.client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_models_with_a_backend_down(make_router, ollama) -> None:
    router = make_router(ollama.url, f"http://127.0.0.1:{free_port()}")
    ids = {d["id"] for d in router.client.get("/v1/models").json()["data"]}
    assert f"ollama:{OLLAMA_MODEL}" in ids and not any(i.startswith("tq:") for i in ids)


def test_metrics_count_requests(router) -> None:
    router.client.post("/v1/chat/completions", json=chat())
    with router.client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        r.read()
    router.client.post("/v1/chat/completions", content=b"{")
    # a stream is counted once its upstream is closed, just after the client's last byte
    router.wait_for(lambda: 'status="200"} 2.0' in router.client.get("/metrics").text)
    m = router.client.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    t = m.text
    assert (
        'tqstack_router_requests_total{backend="ollama",endpoint="chat",'
        'route="auto-short",status="200"} 2.0'
    ) in t
    assert 'status="400"' in t
    assert 'tqstack_router_ttfb_seconds_count{backend="ollama"} 1.0' in t
    assert "tqstack_router_overhead_seconds_count 2.0" in t
    assert 'tqstack_router_active_streams{backend="ollama"} 0.0' in t
    assert 'tqstack_router_backend_up{backend="sidecar"} 1.0' in t


# --- memory saver


def test_memory_saver_unloads_ollama_once_per_switch(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, memory_saver="1")
    assert router.client.get("/health").json()["memory_saver"] is True

    def unloads() -> list:
        return [r for r in ollama.journal.paths("/api/generate") if r.body.get("keep_alive") == 0]

    router.client.post("/v1/chat/completions", json=chat())  # Ollama loads its model
    assert OLLAMA_MODEL in ollama.loaded
    router.client.post("/v1/chat/completions", json=chat(model="tq:auto"))
    assert [u.body["model"] for u in unloads()] == [OLLAMA_MODEL]
    assert OLLAMA_MODEL not in ollama.loaded
    unload_at = unloads()[0].at
    assert unload_at < sidecar.journal.generations()[-1].at  # before the sidecar work
    router.client.post("/v1/chat/completions", json=chat(model="tq:auto"))
    assert len(unloads()) == 1  # not per request
    router.client.post("/v1/chat/completions", json=chat())
    router.client.post("/v1/chat/completions", json=chat(model="tq:auto"))
    assert len(unloads()) == 2  # once per switch


def test_memory_saver_off_never_unloads(router, ollama) -> None:
    router.client.post("/v1/chat/completions", json=chat())
    router.client.post("/v1/chat/completions", json=chat(model="tq:auto"))
    assert not [r for r in ollama.journal.paths("/api/generate")]


# --- configuration and hygiene


def test_sidecar_disabled_routes_everything_to_ollama(make_router, ollama, sidecar) -> None:
    router = make_router(ollama.url, sidecar.url, sidecar_enabled="0")
    h = router.client.get("/health").json()
    assert h["backends"]["sidecar"]["state"] == "disabled" and h["sidecar_available"] is False
    assert h["status"] == "ok"
    r = router.client.post("/v1/chat/completions", json=chat(LONG))
    assert r.headers["x-tqstack-backend"] == "ollama"
    assert not sidecar.journal.generations()


def test_contents_never_logged(router, ollama, caplog) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    secret = "SECRET-PROMPT-7f3a"
    router.client.post("/v1/chat/completions", json=chat(secret))
    ollama.faults.update(die_after_chunks=1)
    router.client.post("/v1/chat/completions", json=chat(secret, stream=True))
    ollama.faults.reset()
    ollama.faults.update(error_status=400, error_message="bad")
    router.client.post("/v1/chat/completions", json=chat(secret))
    router.client.post("/v1/chat/completions", content=b'{"model": "' + secret.encode())
    assert any(r.name.startswith("tqstack") for r in caplog.records)  # the router did log
    assert secret not in caplog.text
    assert "Hello from the fake" not in caplog.text


def test_empty_model_means_auto(router, ollama) -> None:
    r = router.client.post("/v1/chat/completions", json=chat(model=""))
    assert r.status_code == 200 and r.headers["x-tqstack-route"] == "auto-short"
    assert ollama.journal.generations()[-1].body["model"] == OLLAMA_MODEL


def test_embeddings_go_to_ollama(router, ollama) -> None:
    r = router.client.post(
        "/v1/embeddings", json={"model": "ollama:llama3.2:1b", "input": ["a", "b"]}
    )
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert r.headers["x-tqstack-backend"] == "ollama"
    assert ollama.journal.paths("/v1/embeddings")[-1].body["model"] == "llama3.2:1b"
    r = router.client.post("/v1/embeddings", json={"model": "tq:auto", "input": "a"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_value"
    r = router.client.post("/v1/embeddings", json={"model": "auto"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = router.client.post("/v1/embeddings", json={"model": "ollama:nope", "input": "a"})
    assert r.status_code == 404 and r.json()["error"]["component"] == "ollama"
