"""The router app: ``create_app(settings)`` wires routing, proxy, health and metrics.

The lifespan owns the one ``httpx.AsyncClient`` and the health monitor task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import httpx
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.config import Settings, load_settings
from services.errors import APIError, install_error_handlers

from . import routing
from .auth import GateMiddleware
from .health import HealthMonitor
from .memory import MemorySaver, memory_saver_enabled
from .metrics import RouterMetrics
from .proxy import (
    BeforeFirstByte,
    RelayResponse,
    Upstream,
    bad_gateway,
    normalise_body,
    send_upstream,
    upstream_headers,
)
from .routing import OLLAMA, SIDECAR, Backend, BackendView
from .upstream_pool import upstream_client
from .validate import check_chat, check_completion, check_embeddings, read_json_body

log = logging.getLogger("tqstack.router")

Endpoint = Literal["chat", "completions", "embeddings"]
PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


def _unavailable(e: BeforeFirstByte, backend: Backend, what: str) -> APIError:
    """The error for a request no backend took: the upstream's own error when it sent one,
    else a retryable 503 naming the backend."""
    if e.error is not None:
        return e.error
    return APIError(
        503,
        f"{what} ({e}).",
        type="server_error",
        code="backend_unavailable",
        component=backend,
        headers={"retry-after": "1"},
        should_retry=True,
    )


class ClientGone(Exception):
    """The client disconnected while we were waiting on the backend."""


class Router:
    """Per-app state and the request handlers (one instance per ``create_app``)."""

    keepalive = 256  # idle upstream connections kept, over all pools
    shards = 16  # connection pools the relayed requests are spread over

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = RouterMetrics()
        self.sidecar_enabled = settings.sidecar_enabled != "0"
        self.client: httpx.AsyncClient | None = None  # health checks, /v1/models
        self.clients: list[httpx.AsyncClient] = []
        self._next_client = 0
        self.monitor: HealthMonitor | None = None
        self.saver: MemorySaver | None = None
        self.active_streams = 0
        self._urls: dict[tuple[str, str], httpx.URL] = {}

    # --- lifespan
    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        s = self.settings
        timeout = httpx.Timeout(
            connect=s.upstream_connect_timeout_s,
            read=s.upstream_read_timeout_s,
            write=30.0,
            pool=s.upstream_connect_timeout_s,
        )
        # No connection cap: every client stream holds one upstream connection. Several
        # clients (pools): httpcore scans its whole pool on every request, so one pool of
        # hundreds of streams costs more CPU than the relaying itself.
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=max(1, self.keepalive // self.shards)
        )
        tls = httpx.create_ssl_context(trust_env=False)  # one CA bundle load for every shard
        async with contextlib.AsyncExitStack() as stack:
            self.clients = [
                await stack.enter_async_context(upstream_client(timeout, limits, tls))
                for _ in range(self.shards)
            ]
            client = self.client = self.clients[0]
            self.monitor = HealthMonitor(
                client,
                ollama_url=s.ollama_base_url,
                sidecar_url=s.sidecar_base_url,
                interval_s=s.health_interval_s,
                timeout_s=s.health_timeout_s,
                failures_down=s.health_failures_down,
                on_change=lambda b, st: self.metrics.backend_up.labels(b).set(st == "up"),
            )
            if not self.sidecar_enabled:
                self.monitor.backends[SIDECAR].state = "down"
                self.monitor.backends[SIDECAR].last_error = "disabled (SIDECAR_ENABLED=0)"
                self.monitor.check_sidecar = _noop  # type: ignore[method-assign]
            self.saver = MemorySaver(
                memory_saver_enabled(s.memory_saver),
                client,
                s.ollama_base_url,
                self.monitor,
                self.metrics,
            )
            # one round before serving, so the first request knows the sidecar's threshold
            with anyio.move_on_after(s.health_timeout_s + 0.5):
                await self.monitor.check_all()
            self.monitor.start()
            try:
                yield
            finally:
                await self.monitor.stop()

    # --- helpers
    def _views(self, ollama_ctx: int | None) -> dict[Backend, BackendView]:
        m = self.monitor
        assert m is not None
        return {
            OLLAMA: BackendView(m.backends[OLLAMA].available, ollama_ctx),
            SIDECAR: BackendView(
                self.sidecar_enabled and m.backends[SIDECAR].available, m.sidecar_context
            ),
        }

    def _pick_client(self) -> httpx.AsyncClient:
        self._next_client = (self._next_client + 1) % len(self.clients)
        return self.clients[self._next_client]

    def threshold(self) -> tuple[int, str]:
        arch = self.monitor.sidecar_architecture if self.monitor else None
        return routing.threshold_for(self.settings.prompt_token_threshold, arch)

    def _url(self, backend: Backend, endpoint: Endpoint) -> httpx.URL:
        # parsed once: httpx URL parsing is a visible share of per-request CPU
        url = self._urls.get((backend, endpoint))
        if url is None:
            base = (
                self.settings.ollama_base_url
                if backend == OLLAMA
                else (self.settings.sidecar_base_url)
            )
            url = self._urls[(backend, endpoint)] = httpx.URL(base + PATHS[endpoint])
        return url

    def _upstream_model(self, backend: Backend, target: routing.ModelTarget) -> str:
        return routing.upstream_model(
            backend,
            target,
            ollama_default=self.settings.ollama_model,
            sidecar_model=self.monitor.sidecar_model if self.monitor else None,
        )

    def _check_sidecar_target(self, target: routing.ModelTarget) -> None:
        """``tq:<name>`` must name the loaded sidecar model (or ``auto``) once we know it."""
        known = self.monitor.sidecar_model if self.monitor else None
        name = target.name
        if target.forced != SIDECAR or not known or name.lower() in routing.AUTO_NAMES:
            return
        if name in (known, known.rsplit("/", 1)[-1]):
            return
        raise APIError(
            404,
            f"The sidecar serves '{known}', not '{name}'. Use 'tq:auto' or 'tq:{known}'.",
            param="model",
            code="model_not_found",
            component="router",
            should_retry=False,
        )

    # --- the generation endpoints
    async def generate(self, request: Request, endpoint: Endpoint) -> Response:
        """Route and relay one ``/v1/chat/completions`` or ``/v1/completions`` request."""
        t0 = time.perf_counter()
        rid = request.scope.get("state", {}).get("request_id", "")
        backend_label, route_label = "router", "none"
        try:
            body = await read_json_body(request, self.settings.max_request_bytes)
            if endpoint == "chat":
                check_chat(body)
                tokens = routing.estimate_chat_tokens(body["messages"], body.get("tools"))
            else:
                check_completion(body)
                tokens = routing.estimate_completion_tokens(body["prompt"])
            stream = bool(body.get("stream"))
            model = body["model"].strip()
            m = self.monitor
            assert m is not None
            if m.sidecar_model and model == m.sidecar_model:
                model = "tq:" + model  # the sidecar's bare id names the sidecar
            target = routing.parse_model(model)
            self._check_sidecar_target(target)
            ollama_name = self._upstream_model(OLLAMA, target)
            ollama_ctx = await m.ollama_context(ollama_name)
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
            threshold, _ = self.threshold()
            try:
                decision = routing.decide(
                    model, tokens, max_tokens, threshold, self._views(ollama_ctx)
                )
            except routing.RoutingError as e:
                raise APIError(
                    e.status,
                    e.message,
                    code=e.code,
                    component="router",
                    param="messages" if e.status == 400 else None,
                    should_retry=e.status == 503,
                ) from None

            backend, reason = decision.backend, decision.reason
            if reason == "fallback":
                self.metrics.fallbacks.labels(other(backend), backend, "down").inc()
            attempts = [backend]
            # Try the alternate even when health last saw it down: it may be back before the
            # next poll, and a refused connection costs less than a 503 (a disabled sidecar
            # is never tried).
            if decision.alternate and (decision.alternate != SIDECAR or self.sidecar_enabled):
                attempts.append(decision.alternate)
            backend_label, route_label = backend, reason
            result: Upstream | tuple[httpx.Response, bytes] | None = None
            for i, backend in enumerate(attempts):
                backend_label = backend
                up_model = self._upstream_model(backend, target)
                assert self.saver is not None
                await self.saver.before(backend, up_model)
                payload = json.dumps(normalise_body(body, backend, up_model)).encode()
                headers = upstream_headers(request.headers, rid, stream)
                if i == 0:
                    self.metrics.overhead.observe(time.perf_counter() - t0)
                try:
                    result = await _until_disconnect(
                        request,
                        lambda b=backend, p=payload, h=headers: send_upstream(
                            self._pick_client(), b, self._url(b, endpoint), p, h, stream
                        ),
                    )
                except BeforeFirstByte as e:
                    if e.kind != "unavailable":  # a 503 answer means alive, just busy
                        m.record_failure(backend, e.kind)
                    self.metrics.upstream_errors.labels(backend, e.kind).inc()
                    if i + 1 < len(attempts):
                        self.metrics.fallbacks.labels(backend, attempts[i + 1], e.kind).inc()
                        route_label = "fallback"
                        continue
                    raise _unavailable(e, backend, "No backend could take the request") from None
                except APIError as e:
                    kind = "timeout" if e.status == 504 else "status"
                    self.metrics.upstream_errors.labels(backend, kind).inc()
                    raise
                break
            assert result is not None
            out_headers = {
                "x-request-id": rid,
                "x-tqstack-backend": backend_label,
                "x-tqstack-route": route_label,
            }
            if isinstance(result, Upstream):
                return self._relay(result, backend_label, route_label, out_headers, endpoint, t0)
            resp, content = result
            try:
                json.loads(content)
            except ValueError:
                raise bad_gateway(backend_label, "answered with a body that is not JSON") from None
            self.metrics.upstream_latency.labels(backend_label).observe(time.perf_counter() - t0)
            self._count(endpoint, backend_label, route_label, 200)
            return Response(content, 200, headers=out_headers, media_type="application/json")
        except ClientGone:
            self._count(endpoint, backend_label, route_label, 499)
            return Response(status_code=499)
        except APIError as e:
            e.headers.setdefault("x-tqstack-backend", backend_label)
            e.headers.setdefault("x-tqstack-route", route_label)
            self._count(endpoint, backend_label, route_label, e.status)
            raise

    def _relay(
        self,
        up: Upstream,
        backend: Backend,
        route: str,
        headers: dict[str, str],
        endpoint: Endpoint,
        t0: float,
    ) -> RelayResponse:
        ctype = up.response.headers.get("content-type", "")
        headers = {
            "content-type": ctype if ctype.startswith("text/event-stream") else "text/event-stream",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **headers,
        }
        gauge = self.metrics.active_streams.labels(backend)
        gauge.inc()
        self.active_streams += 1

        def first_byte() -> None:
            self.metrics.ttfb.labels(backend).observe(time.perf_counter() - t0)

        def done(outcome: str) -> None:
            gauge.dec()
            self.active_streams -= 1
            self.metrics.upstream_latency.labels(backend).observe(time.perf_counter() - t0)
            if outcome not in ("ok", "disconnect"):
                self.metrics.upstream_errors.labels(backend, outcome).inc()
                if outcome in ("midstream", "timeout"):
                    self.monitor.record_failure(backend, f"stream {outcome}")
            status = {"ok": 200, "disconnect": 499}.get(outcome, 502)
            self._count(endpoint, backend, route, status)

        return RelayResponse(up, backend, headers, done, first_byte)

    def _count(self, endpoint: str, backend: str, route: str, status: int) -> None:
        self.metrics.requests.labels(endpoint, backend, route, str(status)).inc()

    # --- embeddings: Ollama only (the sidecar generates, it does not embed)
    async def embeddings(self, request: Request) -> Response:
        """Relay ``/v1/embeddings`` to Ollama."""
        rid = request.scope.get("state", {}).get("request_id", "")
        route = "prefix"
        try:
            body = await read_json_body(request, self.settings.max_request_bytes)
            check_embeddings(body)
            target = routing.parse_model(body["model"].strip())
            if target.forced == SIDECAR:
                raise APIError(
                    400,
                    "The sidecar does not serve embeddings; use an Ollama model.",
                    param="model",
                    code="unsupported_value",
                    component="router",
                    should_retry=False,
                )
            if target.forced is None:
                route = "auto-short"
            if not self.monitor.backends[OLLAMA].available:
                raise APIError(
                    503,
                    "Ollama, which serves embeddings, is down.",
                    type="server_error",
                    code="backend_unavailable",
                    component="router",
                    headers={"retry-after": "1"},
                    should_retry=True,
                )
            up_model = self._upstream_model(OLLAMA, target)
            payload = json.dumps({**body, "model": up_model}).encode()
            headers = upstream_headers(request.headers, rid, False)
            try:
                result = await _until_disconnect(
                    request,
                    lambda: send_upstream(
                        self._pick_client(),
                        OLLAMA,
                        self._url(OLLAMA, "embeddings"),
                        payload,
                        headers,
                        False,
                    ),
                )
            except BeforeFirstByte as e:
                self.monitor.record_failure(OLLAMA, e.kind)
                raise _unavailable(e, OLLAMA, "Ollama could not take the request") from None
            _, content = result
            self._count("embeddings", OLLAMA, route, 200)
            return Response(
                content,
                200,
                media_type="application/json",
                headers={
                    "x-request-id": rid,
                    "x-tqstack-backend": OLLAMA,
                    "x-tqstack-route": route,
                },
            )
        except ClientGone:
            self._count("embeddings", OLLAMA, route, 499)
            return Response(status_code=499)
        except APIError as e:
            backend = OLLAMA if e.component == OLLAMA else "router"
            e.headers.setdefault("x-tqstack-backend", backend)
            e.headers.setdefault("x-tqstack-route", route if backend == OLLAMA else "none")
            self._count("embeddings", backend, route, e.status)
            raise

    # --- models
    async def list_models(self) -> list[dict[str, Any]]:
        """Both backends' models under prefixed ids, plus the bare ids we auto-route."""
        m = self.monitor
        assert m is not None and self.client is not None
        s = self.settings

        async def fetch(backend: Backend) -> list[dict[str, Any]]:
            if not self._views(None)[backend].available:
                return []
            base = s.ollama_base_url if backend == OLLAMA else s.sidecar_base_url
            try:
                r = await self.client.get(f"{base}/v1/models", timeout=s.health_timeout_s * 2)
                data = r.json().get("data") if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                return []
            return [d for d in (data or []) if isinstance(d, dict) and isinstance(d.get("id"), str)]

        ollama_models, sidecar_models = await asyncio.gather(fetch(OLLAMA), fetch(SIDECAR))
        now = int(time.time())
        out: list[dict[str, Any]] = []
        for d in sidecar_models:
            out.append(
                {
                    "id": f"tq:{d['id']}",
                    "object": "model",
                    "created": d.get("created", now),
                    "owned_by": "tqstack-sidecar",
                    "backend": SIDECAR,
                    "context_length": d.get("context_length") or m.sidecar_context,
                }
            )
        for d in ollama_models:
            ctx = m.ollama_loaded.get(d["id"]) or m.known_ollama_context(d["id"])
            base = {
                "object": "model",
                "created": d.get("created", now),
                "owned_by": d.get("owned_by", "ollama"),
            }
            out.append(
                {"id": f"ollama:{d['id']}", **base, "backend": OLLAMA, "context_length": ctx}
            )
            out.append({"id": d["id"], **base, "backend": "auto", "context_length": ctx})
        if ollama_models or sidecar_models:
            out.append(
                {
                    "id": "auto",
                    "object": "model",
                    "created": now,
                    "owned_by": "tqstack",
                    "backend": "auto",
                    "context_length": None,
                }
            )
        return out

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self.list_models()})

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        for d in await self.list_models():
            if d["id"] == model_id:
                return JSONResponse(d)
        raise APIError(
            404,
            f"The model '{model_id}' does not exist on any backend.",
            param="model",
            code="model_not_found",
            component="router",
            should_retry=False,
        )

    # --- health and metrics
    def health_json(self) -> tuple[int, dict[str, Any]]:
        m = self.monitor
        assert m is not None
        states = {b: st.state for b, st in m.backends.items()}
        if not self.sidecar_enabled:
            states.pop(SIDECAR)
        ups = sum(1 for v in states.values() if v == "up")
        if ups == len(states):
            status = "ok"
        elif ups:
            status = "degraded"
        elif all(v == "down" for v in states.values()):
            status = "down"
        else:
            status = "starting"
        threshold, source = self.threshold()
        backends = {b: st.to_json() for b, st in m.backends.items()}
        if not self.sidecar_enabled:
            backends[SIDECAR]["state"] = "disabled"
        ollama_ctx = m.known_ollama_contexts()
        body = {
            "status": status,
            "backends": backends,
            "sidecar_available": self.sidecar_enabled and states.get(SIDECAR) == "up",
            "sidecar_model": m.sidecar_model,
            "sidecar_architecture": m.sidecar_architecture,
            "prompt_token_threshold": threshold,
            "threshold_source": source,
            "context_lengths": {"ollama": ollama_ctx, "sidecar": m.sidecar_context},
            "memory_saver": bool(self.saver and self.saver.enabled),
            "active_streams": self.active_streams,
        }
        return (503 if status == "down" else 200), body

    async def health(self, request: Request) -> Response:
        code, body = self.health_json()
        return JSONResponse(body, status_code=code)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)


def other(backend: Backend) -> Backend:
    return routing.other(backend)


async def _noop() -> None:
    return None


async def _until_disconnect(request: Request, call: Callable[[], Awaitable[Any]]) -> Any:
    """Await ``call()`` but give up (and cancel it) as soon as the client disconnects."""
    task = asyncio.ensure_future(call())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()  # raises the call's own exception, if any
    task.cancel()
    with contextlib.suppress(BaseException):
        result = await task
        if isinstance(result, Upstream):  # opened just as the client left: close it
            await result.response.aclose()
    raise ClientGone


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the router app for ``settings`` (default: :func:`load_settings`)."""
    settings = settings or load_settings()
    router = Router(settings)
    app = FastAPI(
        title="tqstack router",
        lifespan=router.lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.router = router
    install_error_handlers(app, "router")

    async def chat(request: Request) -> Response:
        return await router.generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await router.generate(request, "completions")

    # Starlette-level routes: the handlers parse bodies themselves (our own 400 messages,
    # and no per-request model validation cost on the hot path).
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/embeddings", router.embeddings, methods=["POST"])
    app.add_route("/v1/models", router.models, methods=["GET"])
    app.add_route("/v1/models/{model_id:path}", router.model, methods=["GET"])
    app.add_route("/health", router.health, methods=["GET"])
    app.add_route("/metrics", router.metrics_endpoint, methods=["GET"])
    app.add_middleware(
        GateMiddleware, api_key=settings.tqstack_api_key, max_body=settings.max_request_bytes
    )
    return app
