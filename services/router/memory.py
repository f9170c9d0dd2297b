"""Memory-saving mode: unload Ollama's model before the sidecar works (small-RAM machines).

Both backends holding a large model at once does not fit in 32 GB; Ollama frees its model
on ``POST /api/generate {"model": m, "keep_alive": 0}``. We do that once per switch from
Ollama to the sidecar, not on every request.
"""

from __future__ import annotations

import asyncio
import logging
import os

import httpx

from .routing import OLLAMA, SIDECAR, Backend

log = logging.getLogger("tqstack.router.memory")

SMALL_RAM_BYTES = 32 * 1024**3


def total_ram_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_saver_enabled(setting: str, ram_bytes: int | None = None) -> bool:
    """``MEMORY_SAVER``: ``1`` on, ``0`` off, ``auto`` on when RAM <= 32 GB."""
    if setting == "1":
        return True
    if setting == "0":
        return False
    ram = total_ram_bytes() if ram_bytes is None else ram_bytes
    return ram is not None and ram <= SMALL_RAM_BYTES


class MemorySaver:
    """Tracks which backend ran last and unloads Ollama's models on a switch to the sidecar."""

    def __init__(
        self,
        enabled: bool,
        client: httpx.AsyncClient,
        ollama_url: str,
        monitor,
        metrics=None,
        timeout_s: float = 5.0,
    ) -> None:
        self.enabled = enabled
        self.client = client
        self.ollama_url = ollama_url
        self.monitor = monitor
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.last: Backend | None = None
        self.used: set[str] = set()  # Ollama models we sent work to since the last unload
        self._lock = asyncio.Lock()

    async def before(self, backend: Backend, model: str) -> None:
        """Call before sending work to ``backend`` with upstream model ``model``."""
        if backend == OLLAMA:
            self.last = OLLAMA
            self.used.add(model)
            return
        if not self.enabled or self.last == SIDECAR:
            self.last = SIDECAR
            return
        async with self._lock:  # concurrent sidecar requests share one unload
            if self.last == SIDECAR:
                return
            if self.monitor.backends[OLLAMA].available:
                models = sorted(set(self.monitor.ollama_loaded) | self.used)
                await asyncio.gather(*(self._unload(m) for m in models))
                self.monitor.forget_loaded(models)
            self.used.clear()
            self.last = SIDECAR

    async def _unload(self, model: str) -> None:
        try:
            r = await self.client.post(
                f"{self.ollama_url}/api/generate",
                json={"model": model, "keep_alive": 0},
                timeout=self.timeout_s,
            )
            if r.status_code == 200:
                log.info("memory saver: unloaded an Ollama model before sidecar work")
                if self.metrics:
                    self.metrics.ollama_unloads.inc()
        except httpx.HTTPError as e:  # best effort: the sidecar request still goes ahead
            log.warning("memory saver: unload failed (%s)", type(e).__name__)
