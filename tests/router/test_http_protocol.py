"""The servers' HTTP stack: httptools (+ uvloop) where installed, h11 on request, and the
parser-level 400 in the OpenAI envelope on both (services/http_protocol.py)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from services.http_protocol import enveloped_h11, enveloped_http, enveloped_httptools
from tests.conftest import free_port
from tests.reliability.test_bad_input import NOT_HTTP, assert_enveloped_400, raw_http

httptools = pytest.importorskip("httptools", reason="httptools is a router dependency")


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_auto_takes_httptools_and_h11_stays_selectable():
    assert enveloped_http("router").__name__ == "EnvelopedHttpToolsProtocol"
    assert enveloped_http("router", "httptools").__name__ == "EnvelopedHttpToolsProtocol"
    assert enveloped_http("router", "h11").__name__ == "EnvelopedH11Protocol"


def test_without_httptools_auto_falls_back_and_an_explicit_choice_fails(without_httptools):
    assert enveloped_httptools("router") is None
    assert enveloped_http("router").__name__ == "EnvelopedH11Protocol"
    with pytest.raises(RuntimeError, match="ROUTER_HTTP=httptools, but httptools is not installed"):
        enveloped_http("router", "httptools")


@pytest.mark.parametrize(
    "protocol, loop",
    [(enveloped_h11, "asyncio"), (enveloped_httptools, "auto")],
    ids=["h11-asyncio", "httptools-auto"],
)
def test_each_parser_answers_non_http_bytes_in_the_envelope(protocol, loop):
    port = free_port()
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http=protocol("router"),
                            loop=loop, log_level="warning", access_log=False)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        for junk in NOT_HTTP:
            assert_enveloped_400(raw_http(port, junk, read_s=5), "router")
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "ok"  # and it keeps serving
    finally:
        server.should_exit = True
        thread.join(10)
