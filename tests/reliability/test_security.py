"""Security: loopback by default, Bearer auth, refusal to expose without a key, no request
content in logs, no credentials or hop-by-hop headers forwarded either way."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import services.router.__main__ as router_main
from services.config import load_settings
from services.router import auth
from tests.conftest import PYTHON, REPO, free_port, stop_process, wait_http
from tests.upstreams import UpstreamServer

from .conftest import OLLAMA_MODEL, chat, lone_router, lone_router_env

KEY = "sk-tq-" + "k" * 40


# --- binding


def test_defaults_bind_loopback(monkeypatch) -> None:
    for var in ("ROUTER_HOST", "SIDECAR_HOST"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings("/nonexistent/config.env")
    assert s.router_host == "127.0.0.1" and s.sidecar_host == "127.0.0.1"
    assert s.tqstack_api_key is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com"])
def test_router_refuses_a_public_bind_without_a_key(monkeypatch, capsys, host) -> None:
    monkeypatch.delenv("TQSTACK_API_KEY", raising=False)
    monkeypatch.setenv("TQSTACK_CONFIG", "/nonexistent/config.env")
    started = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(k))
    assert router_main.main(["--host", host]) == 2
    assert not started
    assert "TQSTACK_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "key"),
    [("127.0.0.1", None), ("localhost", None), ("::1", None), ("0.0.0.0", KEY)],
)
def test_router_binds_loopback_freely_and_public_only_with_a_key(monkeypatch, host, key) -> None:
    monkeypatch.setenv("TQSTACK_CONFIG", "/nonexistent/config.env")
    if key:
        monkeypatch.setenv("TQSTACK_API_KEY", key)
    else:
        monkeypatch.delenv("TQSTACK_API_KEY", raising=False)
    started = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(k))
    assert router_main.main(["--host", host, "--port", "1"]) == 0
    assert started[0]["host"] == host


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* shows them) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            addr, hexport = cols[1].rsplit(":", 1)
            if int(hexport, 16) == port and cols[3] == "0A":  # 0A = LISTEN
                out.append(addr)
    return out


def test_router_process_listens_on_loopback_only(python_env, tmp_path) -> None:
    port = free_port()
    env = lone_router_env(python_env, tmp_path, port)
    env.pop("ROUTER_HOST", None)
    env.pop("TQSTACK_API_KEY", None)
    with lone_router(env, port):
        assert _listening(port) == ["0100007F"]  # 127.0.0.1, and nothing else


def test_sidecar_refuses_a_public_bind(monkeypatch, capsys) -> None:
    # the sidecar has no authentication at all: it must never listen beyond loopback
    import services.sidecar.__main__ as sidecar_main

    monkeypatch.setenv("TQSTACK_CONFIG", "/nonexistent/config.env")
    monkeypatch.setattr(
        "services.sidecar.engine.Engine.__init__",
        lambda *a, **k: pytest.fail("the sidecar started its engine"),
    )
    assert sidecar_main.main(["--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err


# --- Bearer auth


PROTECTED = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/" + OLLAMA_MODEL),
    ("GET", "/metrics"),
    ("GET", "/nowhere"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
]
BAD_AUTH = [
    None,
    "",
    "Bearer",
    "Bearer wrong",
    "Bearer " + KEY[:-1],  # a prefix of the key
    "Bearer " + KEY + "x",  # the key plus more
    "Basic " + KEY,
    KEY,
    "Bearer " + KEY.upper(),
    "Bearer  " + KEY + " junk",
]


@pytest.fixture
def keyed(make_router, ollama, sidecar):
    return make_router(ollama.url, sidecar.url, tqstack_api_key=KEY)


def test_everything_but_health_needs_the_key(keyed, ollama, sidecar) -> None:
    before = len(ollama.journal.generations()) + len(sidecar.journal.generations())
    for method, path in PROTECTED:
        for value in BAD_AUTH:
            headers = {} if value is None else {"authorization": value}
            r = keyed.client.request(method, path, json=chat(), headers=headers)
            assert r.status_code == 401, (method, path, value, r.text)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            assert err["component"] == "router"
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text
    assert len(ollama.journal.generations()) + len(sidecar.journal.generations()) == before
    assert keyed.client.get("/health").status_code == 200


def test_the_right_key_opens_every_endpoint(keyed) -> None:
    h = {"authorization": "Bearer " + KEY}
    assert keyed.client.post("/v1/chat/completions", json=chat(), headers=h).status_code == 200
    assert keyed.client.get("/v1/models", headers=h).status_code == 200
    assert keyed.client.get("/metrics", headers=h).status_code == 200
    h2 = {"authorization": "bearer " + KEY}  # the scheme is case-insensitive (RFC 7235)
    assert keyed.client.post("/v1/chat/completions", json=chat(), headers=h2).status_code == 200


def test_401_comes_before_reading_the_body(keyed) -> None:
    # an unauthenticated client cannot make the router parse (or buffer) its body
    r = keyed.client.post("/v1/chat/completions", content=b"x" * (32 * 1024 * 1024))
    assert r.status_code == 401  # not 413: the key is checked first
    r = keyed.client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 401


def test_key_comparison_is_constant_time(monkeypatch) -> None:
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert not auth.bearer_ok("Bearer short", KEY)  # different length: still compared
    assert not auth.bearer_ok("Bearer " + "k" * len(KEY), KEY)
    assert auth.bearer_ok("Bearer " + KEY, KEY)
    assert len(calls) == 3


# --- logs hold no request content


def test_router_logs_hold_no_request_content(python_env, tmp_path, ollama, sidecar) -> None:
    """Run the real router process at DEBUG through success and failure paths, then grep."""
    secret = "zebra-marmalade-" + str(os.getpid())
    port = free_port()
    log = tmp_path / "router.log"
    env = {
        **python_env,
        "TQSTACK_CONFIG": str(tmp_path / "none.env"),
        "ROUTER_PORT": str(port),
        "OLLAMA_URL": ollama.url,
        "SIDECAR_URL": sidecar.url,
        "LOG_LEVEL": "DEBUG",
        "TQSTACK_API_KEY": KEY,
        "HEALTH_INTERVAL_S": "0.2",
        "UPSTREAM_READ_TIMEOUT_S": "1",
        "MEMORY_SAVER": "0",
    }
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [PYTHON, "-m", "services.router"],
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc=proc, timeout=60)
        h = {"authorization": "Bearer " + KEY}
        c = httpx.Client(base_url=url, headers=h, timeout=10)
        c.post("/v1/chat/completions", json=chat(secret))
        c.post("/v1/chat/completions", json=chat(secret, stream=True))
        c.post("/v1/chat/completions", json=chat(secret, model="tq:" + secret))
        c.post("/v1/chat/completions", json=chat(secret, model=secret))
        c.post("/v1/completions", json={"model": OLLAMA_MODEL, "prompt": secret})
        c.post("/v1/chat/completions", content=b'{"model": "' + secret.encode() + b'", oops')
        c.post("/v1/chat/completions", json={"model": OLLAMA_MODEL, "messages": secret})
        c.post(
            "/v1/chat/completions", json=chat(secret), headers={"authorization": "Bearer " + secret}
        )
        ollama.faults.update(error_status=400, error_message="bad: " + secret)
        c.post("/v1/chat/completions", json=chat(secret))
        ollama.faults.update(error_status=None, die_after_chunks=2)
        c.post("/v1/chat/completions", json=chat(secret, stream=True))
        ollama.faults.update(die_after_chunks=None, garbage_sse=True)
        c.post("/v1/chat/completions", json=chat(secret, stream=True))
        ollama.faults.reset()
        c.get("/v1/models/" + secret)
        c.close()
        time.sleep(0.3)
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "DEBUG" in text or "INFO" in text, "the router logged nothing: the check proves nothing"
    assert secret not in text
    assert KEY not in text


# --- headers, both directions


HOP_AND_CREDENTIALS = {
    "authorization": "Bearer " + KEY,
    "proxy-authorization": "Basic abc",
    "cookie": "session=abc",
    "x-api-key": "sk-other",
    "api-key": "sk-azure",
    "openai-organization": "org-1",
    "connection": "keep-alive, x-hop-custom",
    "x-hop-custom": "drop-me",
    "keep-alive": "timeout=5",
    "te": "trailers",
    "upgrade": "h2c",
    "trailer": "x-t",
    "proxy-connection": "keep-alive",
    "x-forwarded-for": "6.6.6.6",
    "forwarded": "for=6.6.6.6",
    "x-real-ip": "6.6.6.6",
}


def test_client_credentials_and_hop_headers_never_reach_a_backend(make_router, ollama, sidecar):
    r = make_router(ollama.url, sidecar.url, tqstack_api_key=KEY)
    for body in (
        chat(),
        chat(stream=True),
        chat(model="tq:auto"),
        chat(model="tq:auto", stream=True),
    ):
        resp = r.client.post("/v1/chat/completions", json=body, headers=HOP_AND_CREDENTIALS)
        assert resp.status_code == 200
    sent = [g.headers for g in ollama.journal.generations() + sidecar.journal.generations()]
    assert len(sent) == 4
    for headers in sent:
        # httpx adds its own "connection: keep-alive" for the router's pool; never the client's
        leaked = {k for k in headers if k in HOP_AND_CREDENTIALS and k != "connection"}
        assert not leaked, leaked
        assert "x-hop-custom" not in headers.get("connection", "")
        assert KEY not in json.dumps(headers)


def _leaky_upstream():
    """A backend whose answers carry headers that must not reach the router's client."""
    leaky = [
        (b"set-cookie", b"upstream=1"),
        (b"x-internal-secret", b"s3"),
        (b"server", b"leaky"),
        (b"connection", b"x-foo"),
        (b"x-foo", b"bar"),
        (b"www-authenticate", b"Basic"),
    ]

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send(
                {
                    "type": "http.response.body",
                    "body": b'{"status":"ok","model":"m","architecture":"pure_sdpa"}',
                }
            )
            return
        raw = b""
        while True:
            m = await receive()
            raw += m.get("body", b"")
            if not m.get("more_body"):
                break
        if b'"stream": true' in raw:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")] + leaky,
                }
            )
            ev = {
                "id": "x",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}],
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps(ev).encode() + b"\n\ndata: [DONE]\n\n",
                }
            )
        else:
            body = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "a"},
                            "finish_reason": "stop",
                        }
                    ],
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")] + leaky,
                }
            )
            await send({"type": "http.response.body", "body": body})

    return app


def test_backend_response_headers_are_not_relayed(make_router, ollama) -> None:
    fake = UpstreamServer(_leaky_upstream()).start()
    try:
        r = make_router(ollama.url, fake.url)
        r.wait_for(lambda: r.backend_state("sidecar") == "up")
        for stream in (False, True):
            resp = r.client.post("/v1/chat/completions", json=chat(model="tq:auto", stream=stream))
            assert resp.status_code == 200, resp.text
            for h in ("set-cookie", "x-internal-secret", "x-foo", "www-authenticate"):
                assert h not in resp.headers, (stream, h)
            assert resp.headers.get("server", "") != "leaky"
    finally:
        fake.stop()
