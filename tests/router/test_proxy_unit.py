"""Pure parts of the proxy: body normalisation, error mapping, SSE checking, auth."""

from __future__ import annotations

import json

import pytest

from services.router.auth import bearer_ok
from services.router.proxy import SSEChecker, map_upstream_error, normalise_body, upstream_headers


def test_normalise_for_ollama() -> None:
    body = {
        "model": "tq:auto",
        "messages": [],
        "max_completion_tokens": 50,
        "tools": [],
        "tool_choice": "auto",
        "stream_options": {"include_usage": True},
    }
    out = normalise_body(body, "ollama", "qwen:x")
    assert out["model"] == "qwen:x"
    assert out["max_tokens"] == 50 and "max_completion_tokens" not in out
    assert "tools" not in out and "tool_choice" not in out
    assert out["stream_options"] == {"include_usage": True}
    assert body["model"] == "tq:auto" and body["tools"] == []  # the input is untouched


def test_normalise_keeps_explicit_max_tokens_and_real_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = normalise_body(
        {"model": "m", "max_tokens": 7, "max_completion_tokens": 99, "tools": tools},
        "sidecar",
        "mlx/M",
    )
    assert out["max_tokens"] == 7 and out["tools"] == tools and out["model"] == "mlx/M"


def test_upstream_headers_never_carry_credentials() -> None:
    client = {
        "authorization": "Bearer secret",
        "connection": "keep-alive",
        "user-agent": "ua",
        "te": "trailers",
        "cookie": "c=1",
    }
    h = upstream_headers(client, "req_1", True)
    assert "authorization" not in h and "connection" not in h and "cookie" not in h
    assert h["user-agent"] == "ua" and h["x-request-id"] == "req_1"
    assert h["accept-encoding"] == "identity"


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_ollama_envelope_keeps_status_and_names_component() -> None:
    e = map_upstream_error(
        "ollama",
        404,
        body(
            {
                "error": {
                    "message": "model 'x' not found",
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            }
        ),
    )
    b = e.body()["error"]
    assert e.status == 404 and b["component"] == "ollama" and b["code"] == "model_not_found"
    assert b["type"] == "not_found_error" and "model 'x' not found" in b["message"]
    assert e.headers["x-should-retry"] == "false"


def test_mlx_bare_string_404_becomes_502() -> None:
    e = map_upstream_error("sidecar", 404, body({"error": "generation failed: boom"}))
    b = e.body()["error"]
    assert e.status == 502 and b["type"] == "server_error" and b["component"] == "sidecar"
    assert "generation failed" in b["message"]


def test_mlx_bare_string_model_not_found_stays_404() -> None:
    e = map_upstream_error("sidecar", 404, body({"error": "Model 'foo' not found"}))
    assert e.status == 404 and e.body()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("status", "expected"), [(500, 502), (503, 503), (400, 400), (429, 429), (401, 502), (502, 502)]
)
def test_statuses(status: int, expected: int) -> None:
    e = map_upstream_error("ollama", status, b"plain text failure")
    assert e.status == expected
    assert e.body()["error"]["message"].startswith("ollama")


def test_busy_503_asks_for_retry() -> None:
    e = map_upstream_error(
        "ollama", 503, body({"error": {"message": "server busy", "type": "api_error"}})
    )
    assert e.headers["retry-after"] == "1" and e.headers["x-should-retry"] == "true"


def test_sse_checker_accepts_sse_and_sees_done() -> None:
    c = SSEChecker()
    assert c.feed(b': keepalive 1/2\n\ndata: {"a":') is None
    assert c.feed(b"1}\n\nevent: x\nid: 3\n\ndata: [DO") is None
    assert not c.done
    assert c.feed(b"NE]\n\n") is None and c.done


@pytest.mark.parametrize("garbage", [b"hello world\n\n", b"data: not json\n\n", b"<html>\n"])
def test_sse_checker_rejects_garbage(garbage: bytes) -> None:
    assert SSEChecker().feed(b'data: {"ok":1}\n\n' + garbage) is not None


def test_sse_checker_sees_upstream_error_event() -> None:
    c = SSEChecker()
    assert c.feed(b'data: {"error": {"message": "x"}}\n\n') is None and c.errored


def test_bearer() -> None:
    assert bearer_ok("Bearer k3y", "k3y") and bearer_ok("bearer k3y", "k3y")
    assert not bearer_ok("Bearer nope", "k3y") and not bearer_ok(None, "k3y")
    assert not bearer_ok("Basic k3y", "k3y") and not bearer_ok("Bearer ", "k3y")


def test_memory_saver_setting() -> None:
    from services.router.memory import memory_saver_enabled

    gb = 1024**3
    assert memory_saver_enabled("auto", 16 * gb) and memory_saver_enabled("auto", 32 * gb)
    assert not memory_saver_enabled("auto", 64 * gb)
    assert memory_saver_enabled("1", 64 * gb) and not memory_saver_enabled("0", 8 * gb)
