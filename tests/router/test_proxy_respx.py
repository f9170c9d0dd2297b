"""Proxy paths in process: the app over ASGI, backends mocked with respx."""

from __future__ import annotations

import httpx
import pytest
import respx

from services.router.app import create_app

from .conftest import OLLAMA_MODEL, chat, router_settings

OLLAMA = "http://ollama.test"
SIDECAR = "http://sidecar.test"


def mock_health(
    mock: respx.MockRouter, *, sidecar_up: bool = True, architecture: str = "pure_sdpa"
) -> None:
    mock.get(f"{OLLAMA}/api/version").respond(200, json={"version": "0.33.0"})
    mock.get(f"{OLLAMA}/api/ps").respond(200, json={"models": []})
    mock.post(f"{OLLAMA}/api/show").respond(
        200, json={"model_info": {"general.architecture": "qwen3", "qwen3.context_length": 40960}}
    )
    if sidecar_up:
        mock.get(f"{SIDECAR}/health").respond(
            200,
            json={
                "status": "ok",
                "model": "mlx/M",
                "architecture": architecture,
                "context_length": 65536,
            },
        )
    else:
        mock.get(f"{SIDECAR}/health").mock(side_effect=httpx.ConnectError("refused"))


async def call(app, method: str, path: str, **kw) -> httpx.Response:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
            return await c.request(method, path, **kw)


@pytest.mark.anyio
async def test_non_stream_relay_and_normalisation() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock)
        route = mock.post(f"{OLLAMA}/v1/chat/completions").respond(
            200, json={"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
        )
        r = await call(
            app,
            "POST",
            "/v1/chat/completions",
            json=chat(max_completion_tokens=9, tools=[]),
            headers={"authorization": "Bearer x", "connection": "keep-alive"},
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-tqstack-backend"] == "ollama"
    assert r.headers["x-tqstack-route"] == "auto-short"
    sent = route.calls.last.request
    payload = httpx.Response(200, content=sent.content).json()
    assert payload["model"] == OLLAMA_MODEL and payload["max_tokens"] == 9
    assert "max_completion_tokens" not in payload and "tools" not in payload
    assert "authorization" not in sent.headers


@pytest.mark.anyio
async def test_long_prompt_goes_to_sidecar_with_its_exact_model_id() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock)
        route = mock.post(f"{SIDECAR}/v1/chat/completions").respond(200, json={"id": "x"})
        r = await call(app, "POST", "/v1/chat/completions", json=chat("x" * 30000))
    assert r.status_code == 200
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == (
        "sidecar",
        "auto-long",
    )
    assert httpx.Response(200, content=route.calls.last.request.content).json()["model"] == "mlx/M"


@pytest.mark.anyio
async def test_hybrid_sidecar_raises_threshold() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock, architecture="hybrid")
        mock.post(f"{OLLAMA}/v1/chat/completions").respond(200, json={"id": "x"})
        r = await call(app, "POST", "/v1/chat/completions", json=chat("x" * 30000))
    assert r.headers["x-tqstack-backend"] == "ollama"  # ~7500 tokens < 16000


@pytest.mark.anyio
async def test_connect_error_falls_back_to_sidecar() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock)
        mock.post(f"{OLLAMA}/v1/chat/completions").mock(side_effect=httpx.ConnectError("no"))
        mock.post(f"{SIDECAR}/v1/chat/completions").respond(200, json={"id": "y"})
        r = await call(app, "POST", "/v1/chat/completions", json=chat())
    assert r.status_code == 200
    assert (r.headers["x-tqstack-backend"], r.headers["x-tqstack-route"]) == ("sidecar", "fallback")


@pytest.mark.anyio
async def test_both_refuse_is_503_with_retry() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock)
        for base in (OLLAMA, SIDECAR):
            mock.post(f"{base}/v1/chat/completions").mock(side_effect=httpx.ConnectError("no"))
        r = await call(app, "POST", "/v1/chat/completions", json=chat())
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "backend_unavailable"
    assert r.headers["x-should-retry"] == "true"


@pytest.mark.anyio
async def test_upstream_error_envelope_rewritten() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock)
        mock.post(f"{SIDECAR}/v1/chat/completions").respond(404, json={"error": "boom"})
        r = await call(app, "POST", "/v1/chat/completions", json=chat(model="tq:auto"))
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["component"] == "sidecar" and "boom" in err["message"]
    assert r.headers["x-tqstack-backend"] == "sidecar"


@pytest.mark.anyio
async def test_non_json_success_body_is_502() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock)
        mock.post(f"{OLLAMA}/v1/chat/completions").respond(200, text="<html>oops</html>")
        r = await call(app, "POST", "/v1/chat/completions", json=chat())
    assert r.status_code == 502 and r.json()["error"]["component"] == "ollama"


@pytest.mark.anyio
async def test_read_timeout_before_headers_is_504_no_retry() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock)
        mock.post(f"{OLLAMA}/v1/chat/completions").mock(side_effect=httpx.ReadTimeout("slow"))
        r = await call(app, "POST", "/v1/chat/completions", json=chat())
    assert r.status_code == 504 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "upstream_timeout"


@pytest.mark.anyio
async def test_context_learned_from_api_show_and_sidecar_health() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock_health(mock)  # Ollama model: 40960 (/api/show); sidecar: 65536 (/health)
        mock.post(f"{SIDECAR}/v1/chat/completions").respond(200, json={"id": "y"})
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
                # ~5000 prompt tokens is short, but + 40000 max_tokens only fits the sidecar
                moved = await c.post(
                    "/v1/chat/completions", json=chat("x" * 20000, max_tokens=40000)
                )
                nowhere = await c.post(
                    "/v1/chat/completions", json=chat("x" * 20000, max_tokens=70000)
                )
                health = (await c.get("/health")).json()
    assert moved.status_code == 200
    assert (moved.headers["x-tqstack-backend"], moved.headers["x-tqstack-route"]) == (
        "sidecar",
        "context",
    )
    assert nowhere.status_code == 400
    assert nowhere.json()["error"]["code"] == "context_length_exceeded"
    assert nowhere.headers["x-should-retry"] == "false"
    assert health["context_lengths"] == {"ollama": {OLLAMA_MODEL: 40960}, "sidecar": 65536}


@pytest.mark.anyio
async def test_failing_api_show_is_not_asked_on_every_request() -> None:
    app = create_app(router_settings(OLLAMA, SIDECAR, health_interval_s=60))
    with respx.mock(assert_all_called=False) as mock:
        mock.get(f"{OLLAMA}/api/version").respond(200, json={"version": "0.33.0"})
        mock.get(f"{OLLAMA}/api/ps").respond(200, json={"models": []})
        mock.get(f"{SIDECAR}/health").mock(side_effect=httpx.ConnectError("refused"))
        show = mock.post(f"{OLLAMA}/api/show").mock(side_effect=httpx.ReadTimeout("slow"))
        mock.post(f"{OLLAMA}/v1/chat/completions").respond(200, json={"id": "x"})
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
                for _ in range(3):
                    r = await c.post("/v1/chat/completions", json=chat())
                    assert r.status_code == 200  # unknown context: assumed to fit
    assert show.call_count == 1
