"""Malformed requests get an OpenAI 4xx from the router, never a 5xx, a hang or a forward.

The corpus (``corpus.py``) covers bad JSON, wrong types, deep nesting, invalid UTF-8,
non-finite numbers, empty and missing fields, negative and huge ``max_tokens``; the rest of
this module covers what needs its own wire: huge and chunked bodies, lying Content-Length,
header injection, unknown fields, wrong methods and paths, raw non-HTTP bytes.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from services.router.app import create_app
from tests.conftest import free_port
from tests.upstreams import FakeOllama, FakeSidecar, UpstreamServer

from .conftest import OLLAMA_MODEL, lone_router, lone_router_env, router_settings
from .corpus import CASES, FORWARDED
from .outcome import envelope_component

LIMIT = 64 * 1024  # MAX_REQUEST_BYTES for this module's router


class Stack:
    def __init__(self) -> None:
        self.ollama = FakeOllama().start()
        self.sidecar = FakeSidecar().start()
        app = create_app(
            router_settings(self.ollama.url, self.sidecar.url, max_request_bytes=LIMIT)
        )
        self.server = UpstreamServer(app, lifespan="on").start()
        self.client = httpx.Client(base_url=self.server.url, timeout=20)

    def generations(self) -> int:
        return len(self.ollama.journal.generations()) + len(self.sidecar.journal.generations())

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.ollama.stop()
        self.sidecar.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    yield s
    s.close()


def assert_router_4xx(r: httpx.Response, status: int | None = None) -> dict:
    """An OpenAI error envelope from the router with a 4xx status."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    ok, comp = envelope_component(body)
    assert ok and comp == "router", body
    return body["error"]


@pytest.mark.parametrize(
    ("path", "raw", "headers"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_corpus_is_refused_with_an_openai_4xx(stack: Stack, path, raw, headers) -> None:
    before = stack.generations()
    r = stack.client.post(
        path, content=raw, headers={"content-type": "application/json", **headers}
    )
    err = assert_router_4xx(r)
    assert r.headers.get("x-should-retry") == "false"  # the same request would fail again
    assert err["message"] and len(err["message"]) < 2000
    assert stack.generations() == before, "a malformed request reached a backend"


# --- size limits


def test_body_over_the_limit_with_content_length_is_413(stack: Stack) -> None:
    big = json.dumps(
        {"model": OLLAMA_MODEL, "messages": [{"role": "user", "content": "x" * LIMIT}]}
    )
    err = assert_router_4xx(stack.client.post("/v1/chat/completions", content=big), 413)
    assert err["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_refused_before_the_rest_is_sent(stack: Stack) -> None:
    # chunked: no Content-Length to judge by; the router must stop reading at the limit
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"x" * (LIMIT + 1024)
    chunk = hex(len(piece))[2:].encode() + b"\r\n" + piece + b"\r\n"
    resp = raw_http(stack, head + chunk)  # the terminating 0-chunk is never sent
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    body = json.loads(resp.partition(b"\r\n\r\n")[2])
    assert envelope_component(body) == (True, "router")


def test_body_at_the_limit_is_accepted(stack: Stack) -> None:
    head = {"model": OLLAMA_MODEL, "messages": [{"role": "user", "content": ""}]}
    pad = LIMIT - len(json.dumps(head))
    head["messages"][0]["content"] = "y" * pad
    raw = json.dumps(head).encode()
    assert len(raw) == LIMIT
    assert stack.client.post("/v1/chat/completions", content=raw).status_code == 200


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", " "])
def test_bad_content_length_header_is_400(stack: Stack, value: str) -> None:
    r = raw_http(
        stack,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + value.encode()
        + b"\r\n\r\n{}",
    )
    assert r.startswith(b"HTTP/1.1 4"), r[:200]


@pytest.mark.parametrize(
    ("path", "raw", "headers"), [c[1:] for c in FORWARDED], ids=[c[0] for c in FORWARDED]
)
def test_deeper_mistakes_are_left_to_the_backend(stack: Stack, path, raw, headers) -> None:
    r = stack.client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500 or r.json()["error"].get("component") != "router", r.text[:300]


def test_many_tiny_messages_are_answered(stack: Stack) -> None:
    msgs = [{"role": "user", "content": "a"}] * 2000
    r = stack.client.post("/v1/chat/completions", json={"model": OLLAMA_MODEL, "messages": msgs})
    assert r.status_code in (200, 400), r.text[:300]


# --- headers, methods, paths, raw bytes


def raw_http(stack: Stack | int, request: bytes, read_s: float = 5.0) -> bytes:
    """Send raw bytes to the router (or to a port); return what came back before it closed
    or went quiet."""
    port = stack if isinstance(stack, int) else stack.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        s.sendall(request)
        out = b""
        try:
            while b"\r\n\r\n" not in out or not _complete(out):
                piece = s.recv(65536)
                if not piece:
                    break
                out += piece
        except TimeoutError:
            pass
    return out


def _complete(resp: bytes) -> bool:
    head, _, rest = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":")[1])
    return False


def test_header_injection_in_model_does_not_reach_response_headers(stack: Stack) -> None:
    for model in ("x\r\nSet-Cookie: pwned=1", "tq:x\r\n\r\nHTTP/1.1 200 OK", "ollama:a\nb"):
        r = stack.client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code < 500, r.text[:300]
        assert "set-cookie" not in r.headers
        for k, v in r.headers.items():
            assert "\n" not in k + v and "\r" not in k + v


def test_crlf_in_request_headers_is_refused_by_the_http_layer(stack: Stack) -> None:
    # a bare CR inside a header value: the HTTP parser refuses it before any app code runs
    resp = raw_http(
        stack,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"X-Evil: a\rInjected: yes\r\nContent-Length: 2\r\n\r\n{}",
    )
    assert resp.startswith(b"HTTP/1.1 400"), resp[:200]


def test_client_request_id_and_tqstack_headers_cannot_be_spoofed(stack: Stack) -> None:
    r = stack.client.post(
        "/v1/chat/completions",
        json={"model": OLLAMA_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": "evil-id", "x-tqstack-backend": "sidecar"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers["x-tqstack-backend"] == "ollama"


def test_unknown_fields_pass_through(stack: Stack) -> None:
    body = {
        "model": OLLAMA_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "some_future_field": {"nested": [1, 2, 3]},
        "x-extra": None,
    }
    r = stack.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text[:300]
    assert stack.ollama.journal.generations()[-1].body["some_future_field"] == {"nested": [1, 2, 3]}


def test_lone_surrogate_and_nul_in_content_are_answered(stack: Stack) -> None:
    content = '"a\\ud800b\\u0000c"'  # escapes kept: JSON text with a lone surrogate and NUL
    raw = (
        '{"model":"' + OLLAMA_MODEL + '","messages":[{"role":"user","content":' + content + "}]}"
    ).encode()
    r = stack.client.post("/v1/chat/completions", content=raw)
    assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/completions", 405),
        ("POST", "/v1/nothing", 404),
        ("GET", "/../../etc/passwd", 404),
        ("DELETE", "/v1/models", 405),
        ("POST", "/health", 405),
    ],
)
def test_wrong_method_or_path_is_an_openai_error(stack: Stack, method, path, status) -> None:
    assert_router_4xx(stack.client.request(method, path), status)


# What the HTTP parser itself refuses, before any app code runs.
NOT_HTTP = (
    b"\x00\x01\x02\xff" * 64 + b"\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\n" + b"A" * 70000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\rInjected: 1\r\n\r\n",  # a bare CR in a header
)


def assert_enveloped_400(resp: bytes, component: str) -> None:
    """What the server processes answer bytes their HTTP parser refuses: a 400 in the
    OpenAI envelope (uvicorn's own answer is plain text)."""
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), resp[:200]
    assert b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_http", err
    assert err["component"] == component and err["param"] is None and err["message"], err


def test_the_router_process_answers_non_http_bytes_in_the_openai_envelope(
    python_env, tmp_path
) -> None:
    port = free_port()
    with lone_router(lone_router_env(python_env, tmp_path, port), port):
        for junk in NOT_HTTP:
            assert_enveloped_400(raw_http(port, junk, read_s=5), "router")
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code in (200, 503)


def test_raw_garbage_bytes_get_a_4xx_and_the_router_stays_up(stack: Stack) -> None:
    for junk in (*NOT_HTTP, b"GET / HTTP/9.9\r\n\r\n"):
        resp = raw_http(stack, junk, read_s=3)
        assert resp == b"" or resp.startswith(b"HTTP/1.1 4"), resp[:200]
    assert stack.client.get("/health").status_code == 200
