"""Background health monitor: per-backend state, sidecar facts, Ollama context lengths.

One asyncio task (started by the app lifespan) polls both backends every
``health_interval_s`` with a short timeout. A backend is ``unknown`` until its first check,
``down`` after ``health_failures_down`` consecutive failures, and ``up`` again after one
success. Failed requests count as failures too, so a dead backend is noticed between polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .routing import OLLAMA, SIDECAR, Backend

log = logging.getLogger("tqstack.router.health")

SHOW_CACHE_S = 300.0  # /api/show answers change only when a model is re-pulled
SHOW_RETRY_S = 10.0  # after a failed /api/show, requests do not wait on it again for this long


@dataclass
class BackendState:
    """Health of one backend as the router last saw it."""

    name: Backend
    url: str
    state: str = "unknown"  # up | down | unknown
    last_check: float | None = None  # unix time of the last check (poll or request)
    last_ok: float | None = None
    latency_ms: float | None = None
    consecutive_failures: int = 0
    last_error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """Worth sending a request to: up, or not yet known to be down."""
        return self.state != "down"

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "url": self.url,
            "last_check": self.last_check,
            "last_ok": self.last_ok,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            **self.detail,
        }


class HealthMonitor:
    """Polls the backends and keeps what they tell us (architecture, context lengths)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        ollama_url: str,
        sidecar_url: str,
        interval_s: float,
        timeout_s: float,
        failures_down: int,
        on_change: Any = None,
    ) -> None:
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures_down = max(1, failures_down)
        self.backends: dict[Backend, BackendState] = {
            OLLAMA: BackendState(OLLAMA, ollama_url),
            SIDECAR: BackendState(SIDECAR, sidecar_url),
        }
        # sidecar facts from its /health
        self.sidecar_model: str | None = None
        self.sidecar_architecture: str | None = None
        self.sidecar_context: int | None = None
        # Ollama: context of each loaded model (/api/ps) and of models asked about (/api/show)
        self.ollama_loaded: dict[str, int | None] = {}
        self._show_cache: dict[str, tuple[float, int | None]] = {}
        self._on_change = on_change
        self._task: asyncio.Task | None = None

    # --- state transitions
    def record_success(self, name: Backend, latency_ms: float | None = None) -> None:
        """A check or a request succeeded: the backend is up."""
        b = self.backends[name]
        now = time.time()
        b.last_check = b.last_ok = now
        if latency_ms is not None:
            b.latency_ms = latency_ms
        b.consecutive_failures = 0
        b.last_error = None
        self._set_state(b, "up")

    def record_failure(self, name: Backend, error: str) -> None:
        """A check or a request failed; N in a row make the backend down."""
        b = self.backends[name]
        b.last_check = time.time()
        b.consecutive_failures += 1
        b.last_error = error
        if b.consecutive_failures >= self.failures_down:
            self._set_state(b, "down")

    def _set_state(self, b: BackendState, state: str) -> None:
        if b.state != state:
            log.info("backend %s: %s -> %s", b.name, b.state, state)
            b.state = state
            if self._on_change:
                self._on_change(b.name, state)

    # --- checks
    async def check_ollama(self) -> None:
        """``GET /api/version``, then ``/api/ps`` for the loaded models' context lengths."""
        b = self.backends[OLLAMA]
        t0 = time.perf_counter()
        try:
            r = await self.client.get(f"{b.url}/api/version", timeout=self.timeout_s)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            version = (
                r.json().get("version")
                if r.headers.get("content-type", "").startswith("application/json")
                else None
            )
        except Exception as e:  # any failure is a failed check
            self.record_failure(OLLAMA, _describe(e))
            return
        self.record_success(OLLAMA, (time.perf_counter() - t0) * 1000)
        if version:
            b.detail["version"] = version
        with contextlib.suppress(Exception):
            r = await self.client.get(f"{b.url}/api/ps", timeout=self.timeout_s)
            if r.status_code == 200:
                loaded: dict[str, int | None] = {}
                for m in r.json().get("models") or []:
                    name = m.get("model") or m.get("name")
                    if name:
                        ctx = m.get("context_length")
                        loaded[name] = int(ctx) if isinstance(ctx, int) and ctx > 0 else None
                self.ollama_loaded = loaded
                b.detail["loaded_models"] = sorted(loaded)

    async def check_sidecar(self) -> None:
        """``GET /health``: 200 with ``status: ok`` is up; 503 ``loading`` is not yet."""
        b = self.backends[SIDECAR]
        t0 = time.perf_counter()
        try:
            r = await self.client.get(f"{b.url}/health", timeout=self.timeout_s)
            data = r.json() if r.content else {}
            status = data.get("status") if isinstance(data, dict) else None
            if r.status_code != 200 or status not in (None, "ok"):
                b.detail["status"] = status or f"http {r.status_code}"
                raise RuntimeError(f"sidecar status {status or r.status_code}")
        except Exception as e:
            self.record_failure(SIDECAR, _describe(e))
            return
        self.record_success(SIDECAR, (time.perf_counter() - t0) * 1000)
        b.detail["status"] = "ok"
        if isinstance(data.get("model"), str):
            self.sidecar_model = data["model"]
        if data.get("architecture") in ("pure_sdpa", "hybrid"):
            self.sidecar_architecture = data["architecture"]
        ctx = data.get("context_length")
        if isinstance(ctx, int) and ctx > 0:
            self.sidecar_context = ctx
        b.detail.update(
            model=self.sidecar_model,
            architecture=self.sidecar_architecture,
            context_length=self.sidecar_context,
        )

    async def check_all(self) -> None:
        """One round: both backends concurrently."""
        await asyncio.gather(self.check_ollama(), self.check_sidecar())

    async def ollama_context(self, model: str) -> int | None:
        """Context length Ollama will use for ``model``: /api/ps if loaded, else /api/show."""
        if model in self.ollama_loaded and self.ollama_loaded[model]:
            return self.ollama_loaded[model]
        hit = self._show_cache.get(model)
        if hit and time.monotonic() - hit[0] < SHOW_CACHE_S:
            return hit[1]
        if not self.backends[OLLAMA].available:
            return hit[1] if hit else None
        ctx: int | None = None
        try:
            r = await self.client.post(
                f"{self.backends[OLLAMA].url}/api/show",
                json={"model": model},
                timeout=self.timeout_s,
            )
            if r.status_code == 200:
                ctx = context_from_show(r.json())
        except Exception:
            # unknown: assume it fits rather than refuse; ask again in a while, not per request
            ctx = hit[1] if hit else None
            self._show_cache[model] = (time.monotonic() - SHOW_CACHE_S + SHOW_RETRY_S, ctx)
            return ctx
        self._show_cache[model] = (time.monotonic(), ctx)
        return ctx

    def known_ollama_context(self, model: str) -> int | None:
        """The context length last learned for ``model`` (no I/O)."""
        if self.ollama_loaded.get(model):
            return self.ollama_loaded[model]
        hit = self._show_cache.get(model)
        return hit[1] if hit else None

    def known_ollama_contexts(self) -> dict[str, int]:
        """Every Ollama context length we know, loaded models first."""
        out = {name: ctx for name, (_, ctx) in self._show_cache.items() if ctx}
        out.update({k: v for k, v in self.ollama_loaded.items() if v})
        return out

    def forget_loaded(self, models: list[str]) -> None:
        """Models we just unloaded no longer have a /api/ps context."""
        for m in models:
            self.ollama_loaded.pop(m, None)

    # --- the background task
    async def run(self) -> None:
        """Poll forever (until cancelled)."""
        while True:
            t0 = time.monotonic()
            try:
                await self.check_all()
            except Exception as e:  # never let the monitor die
                log.warning("health round failed: %s", type(e).__name__)
            await asyncio.sleep(max(0.05, self.interval_s - (time.monotonic() - t0)))

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="tqstack-health")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


def context_from_show(data: Any) -> int | None:
    """``<arch>.context_length`` from an ``/api/show`` answer (None if absent)."""
    if not isinstance(data, dict):
        return None
    info = data.get("model_info") or {}
    if not isinstance(info, dict):
        return None
    arch = info.get("general.architecture")
    if arch and isinstance(info.get(f"{arch}.context_length"), int):
        return info[f"{arch}.context_length"]
    for k, v in info.items():
        if k.endswith(".context_length") and isinstance(v, int):
            return v
    return None


def _describe(e: Exception) -> str:
    """A short, content-free description of a failure for /health."""
    if isinstance(e, httpx.ConnectError):
        return "connection refused"
    if isinstance(e, httpx.TimeoutException):
        return "timeout"
    return str(e)[:200] or type(e).__name__
