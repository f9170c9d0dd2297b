"""The MLX engine: one worker thread owns the model, the caches and every MLX call.

HTTP handlers tokenize (the tokenizer is not MLX), check limits, and :meth:`Engine.submit`
a :class:`Job`. The worker takes jobs one at a time from a bounded queue, reuses the
longest cached token prefix (mlx-lm's ``LRUPromptCache`` over our per-request caches),
prefills in chunks, samples with mlx-lm's ``generate_step``, and pushes events
(:class:`Progress`, :class:`~services.sidecar.output.Delta`, :class:`Done`) onto the job's
asyncio queue through its event loop. A cancelled job stops within one token.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from services.errors import APIError
from services.sidecar.output import Delta, Markers, OutputParser
from services.sidecar.schemas import GenParams

log = logging.getLogger("tqstack.sidecar")

PREFILL_STEP = 512  # prompt tokens per forward pass: bounds latency of cancel/progress
MIN_REUSE_TOKENS = 16  # shorter cached prefixes are not worth reusing
KV_SNAPSHOT_EVERY = 16  # decode tokens between per-request KV memory snapshots


class _Cancelled(Exception):
    """Raised inside the prefill callback to abandon a cancelled job."""


@dataclass
class Progress:
    """Prompt processing progress (drives SSE keepalives)."""

    processed: int
    total: int


@dataclass
class Done:
    """The end of a job: why it finished and its token counts."""

    finish_reason: str  # stop | length | tool_calls | cancelled
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    """The job failed after it was accepted."""

    error: APIError


@dataclass
class Job:
    """One generation request as the worker sees it (no request text kept beyond tokens)."""

    prompt: list[int]
    params: GenParams
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    text_completion: bool = False  # keep a leading space (clients append to the prompt)
    state: str = "queued"
    cached_tokens: int = 0
    completion_tokens: int = 0
    kv: dict[str, int] = field(
        default_factory=lambda: {"fp16_equivalent_bytes": 0, "actual_bytes": 0}
    )
    submitted: float = field(default_factory=time.monotonic)
    finished: bool = False

    def emit(self, event: Any) -> None:
        """Hand an event to the request's event loop (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # loop closed: the client is long gone
            self.cancel.set()

    def describe(self) -> dict[str, Any]:
        """Per-request line of /health (numbers only, never content)."""
        return {
            "id": self.id,
            "state": self.state,
            "prompt_tokens": len(self.prompt),
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "max_tokens": self.max_tokens,
            "kv_fp16_equivalent_bytes": self.kv["fp16_equivalent_bytes"],
            "kv_actual_bytes": self.kv["actual_bytes"],
            "age_s": round(time.monotonic() - self.submitted, 3),
        }


def _keep_leading_space(detok: Any) -> None:
    """mlx-lm's streaming detokenizers drop the first token's leading space (right for chat);
    a text completion continues the prompt, so pretend text was already emitted."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    if isinstance(detok, (BPEStreamingDetokenizer, SPMStreamingDetokenizer)):
        detok.text, detok.offset = "\x00", 1


def _with_history(processors: list, prefix: list[int]) -> list:
    """Penalties must see the prompt tokens a prefix-cache hit skipped, or reuse would
    change the answer: generate_step only shows processors the tokens it processes."""
    import mlx.core as mx

    # Penalty windows are 64 tokens: the tail is all any processor looks at.
    head = mx.array(prefix[-256:])

    def wrap(proc):
        return lambda tokens, logits: proc(mx.concatenate([head, tokens]), logits)

    return [wrap(proc) for proc in processors]


class Engine:
    """Loads the model on its own thread and serves jobs from a bounded queue."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.status = "loading"
        self.error: str | None = None
        self.loaded: Any = None  # services.sidecar.loader.LoadedModel
        self.backend: Any = None  # services.sidecar.kv.KVBackend
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._active: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._prompt_cache: Any = None
        self._memory: dict[str, int] = {}
        self._job_seconds = 2.0  # running mean of job durations, for Retry-After
        self.tokenizer_lock = threading.Lock()
        self.counters = {
            "completed": 0,
            "cancelled": 0,
            "failed": 0,
            "rejected_busy": 0,
            "prompt_cache_hits": 0,
            "prompt_tokens_reused": 0,
        }
        self.on_failure: Any = None  # called (on the worker) if loading fails

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the worker thread: it loads the model, then serves jobs."""
        self._thread = threading.Thread(target=self._main, name="mlx-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and join the worker."""
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.cancel.set()
            if self._active is not None:
                self._active.cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def _main(self) -> None:
        try:
            self._load()
        except Exception as e:  # report through /health and let __main__ exit non-zero
            self.status = "failed"
            self.error = f"{type(e).__name__}: {e}"
            log.exception("sidecar model failed to load")
            if self.on_failure is not None:
                self.on_failure()
            return
        self.status = "ready"
        log.info(
            "sidecar ready: model=%s context=%d", self.loaded.model_id, self.loaded.context_length
        )
        self._serve()

    def _load(self) -> None:
        import mlx.core as mx
        from mlx_lm.models.cache import LRUPromptCache

        from services.sidecar import kv, loader

        t0 = time.monotonic()
        if self.settings.tq_enabled:  # (before any cache is made: patch.ensure_patched reads it)
            from services.turboquant import rope_fusion

            rope_fusion.set_enabled(self.settings.tq_fuse_rope)
        self.loaded = loader.load(self.settings)
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(self.loaded.dtype, 2)
        self.backend = kv.build_backend(self.loaded.model, self.settings, itemsize)
        self._prompt_cache = LRUPromptCache(
            max_size=max(0, self.settings.sidecar_prompt_cache_entries)
        )
        self._warm_up()
        self._refresh_memory()
        log.info(
            "loaded %s (%s, %s) in %.1fs; cache=%s",
            self.loaded.model_id,
            self.backend.kind,
            self.loaded.dtype,
            time.monotonic() - t0,
            "turboquant" if self.backend.turboquant else "plain",
        )
        mx.reset_peak_memory()

    def _warm_up(self) -> None:
        """One prefill + two decode steps through the real cache and attention path."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        tok = self.loaded.tokenizer
        ids = tok.encode("Hello, world.", add_special_tokens=False) or [0]
        cache = self.backend.make_cache()
        gen = generate_step(mx.array(ids), self.loaded.model, max_tokens=2, prompt_cache=cache)
        for _ in gen:
            pass
        if self.backend.turboquant and self.settings.tq_warm_kernels:
            from services.turboquant.kernels.fused_decode import cuda_available

            if cuda_available():
                self._warm_kernels(ids)

    def _warm_kernels(self, ids: list[int]) -> None:
        """On CUDA: a synthetic generation through every decode-kernel variant this model's
        cache reaches, so none compiles (seconds) inside a request (kernels/warm.py)."""
        from services.turboquant.kernels import warm

        t0 = time.monotonic()
        warm.warm_model(self.loaded.model, self.backend.make_cache, self.backend.tq_config, ids)
        log.info("decode kernels built in %.1fs", time.monotonic() - t0)

    # ----------------------------------------------------------------- queue

    def submit(self, job: Job) -> None:
        """Queue a job or raise 429 (queue full) / 503 (not ready)."""
        if not self.ready:
            raise APIError(
                503,
                f"The sidecar model is {self.status}.",
                code="model_not_ready",
                headers={"Retry-After": "2"},
            )
        with self._cond:
            busy = len(self._pending) + (1 if self._active is not None else 0)
            if busy >= self.settings.sidecar_max_queue + 1:
                self.counters["rejected_busy"] += 1
                wait = max(1, math.ceil(self._job_seconds * busy))
                raise APIError(
                    429,
                    f"The sidecar is busy ({busy} requests in progress or "
                    f"queued; the queue holds {self.settings.sidecar_max_queue}). "
                    "Retry later.",
                    code="queue_full",
                    headers={"Retry-After": str(min(wait, 120))},
                )
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: drop it from the queue, or make the worker stop within one token."""
        if job.finished:
            return
        job.cancel.set()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                job.finished = True
                job.state = "cancelled"
                self.counters["cancelled"] += 1

    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._pending and not self._stopping:
                if not self._cond.wait(timeout=1.0):
                    break
            if self._stopping or not self._pending:
                return None
            job = self._pending.popleft()
            self._active = job
            return job

    def _serve(self) -> None:
        while not self._stopping:
            job = self._next_job()
            if job is None:
                self._refresh_memory()
                continue
            t0 = time.monotonic()
            try:
                self._run(job)
            except _Cancelled:
                self._finish(
                    job,
                    Done("cancelled", len(job.prompt), job.completion_tokens, job.cached_tokens),
                )
            except Exception as e:
                log.exception("request %s failed", job.id)
                self.counters["failed"] += 1
                job.emit(
                    Failed(
                        APIError(
                            500,
                            f"Generation failed: {type(e).__name__}: {e}",
                            code="generation_failed",
                        )
                    )
                )
                job.finished = True
            finally:
                with self._cond:
                    self._active = None
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.monotonic() - t0)
                self._refresh_memory()

    # ----------------------------------------------------------------- generation

    def _fetch_cache(self, prompt: list[int]) -> tuple[list, list[int]]:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        model_id = self.loaded.model_id
        cache, rest = None, prompt
        if self._prompt_cache is not None and self._prompt_cache.max_size > 0:
            cache, rest = self._prompt_cache.fetch_nearest_cache(model_id, list(prompt))
        if cache is not None and len(prompt) - len(rest) < MIN_REUSE_TOKENS:
            # A few shared template tokens save nothing and would tie this request's cache to
            # another conversation's (quantization state included): start fresh.
            cache, rest = None, prompt
        if cache is not None and not rest:
            # Exact hit: the last prompt token must go through the model again for logits.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        if cache is None:
            return self.backend.make_cache(), list(prompt)
        return cache, list(rest)

    def _run(self, job: Job) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import can_trim_prompt_cache
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        if job.cancel.is_set():
            raise _Cancelled
        p = job.params
        tok = self.loaded.tokenizer
        job.state = "prefill"
        if p.cache_prompt:
            try:
                cache, rest = self._fetch_cache(job.prompt)
            except Exception as e:  # a cache that cannot be copied or trimmed: start fresh
                log.warning("prompt cache lookup failed (%s); starting fresh", type(e).__name__)
                cache, rest = self.backend.make_cache(), list(job.prompt)
        else:
            cache, rest = self.backend.make_cache(), list(job.prompt)
        job.cached_tokens = len(job.prompt) - len(rest)
        if job.cached_tokens:
            self.counters["prompt_cache_hits"] += 1
            self.counters["prompt_tokens_reused"] += job.cached_tokens
        parser = OutputParser(Markers.from_tokenizer(tok, job.prompt), p.stop, p.tools)
        detok = tok.detokenizer
        if job.text_completion:
            _keep_leading_space(detok)
        eos = set(tok.eos_token_ids)
        if p.seed is not None:
            mx.random.seed(p.seed)
        sampler = make_sampler(
            p.temperature, top_p=p.top_p if p.top_p < 1.0 else 0.0, min_p=p.min_p, top_k=p.top_k
        )
        processors = make_logits_processors(
            p.logit_bias,
            p.repetition_penalty,
            64,
            p.presence_penalty,
            64,
            p.frequency_penalty,
            64,
        )
        if processors and job.cached_tokens:
            processors = _with_history(processors, job.prompt[: job.cached_tokens])
        total = len(job.prompt)
        # A cache that cannot be trimmed (recurrent layers of hybrid models) can only be
        # reused by prompts that extend its tokens exactly: keep a copy at prompt[:-1] too, so
        # that the next turn (or the same prompt again) reuses the whole prompt.
        checkpoint: list = []
        want_checkpoint = p.cache_prompt and len(rest) > 1 and not can_trim_prompt_cache(cache)

        def progress(done: int, _total: int) -> None:
            if job.cancel.is_set():
                raise _Cancelled
            job.emit(Progress(job.cached_tokens + done, total))
            if done:
                job.kv = self.backend.memory(cache)
            if want_checkpoint and done == len(rest) - 1 and not checkpoint:
                checkpoint.append(copy.deepcopy(cache))

        tokens: list[int] = []
        finish = "length"
        t0 = time.monotonic()
        ttft = None
        gen = generate_step(
            mx.array(rest),
            self.loaded.model,
            max_tokens=-1,
            sampler=sampler,
            logits_processors=processors or None,
            prompt_cache=cache,
            prefill_step_size=PREFILL_STEP,
            prompt_progress_callback=progress,
        )
        try:
            for token, _ in gen:
                if ttft is None:
                    ttft = time.monotonic() - t0
                    job.state = "decode"
                tokens.append(token)
                job.completion_tokens = len(tokens)
                if token in eos:
                    finish = "stop"
                    break
                detok.add_token(token)
                delta = parser.feed(detok.last_segment)
                if delta:
                    job.emit(delta)
                if parser.stopped:
                    finish = "stop"
                    break
                if len(tokens) >= job.max_tokens:
                    break
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
                if len(tokens) % KV_SNAPSHOT_EVERY == 0:
                    job.kv = self.backend.memory(cache)
        finally:
            gen.close()
        job.kv = self.backend.memory(cache)
        if not parser.stopped and finish != "cancelled":
            detok.finalize()
            last = parser.feed(detok.last_segment)
            last_tail = parser.finish()
            merged = Delta(
                last.content + last_tail.content,
                last.reasoning + last_tail.reasoning,
                last.tool_calls + last_tail.tool_calls,
            )
            if merged:
                job.emit(merged)
        if finish == "stop" and parser.made_tool_call:
            finish = "tool_calls"
        if p.cache_prompt:
            if checkpoint:
                self._store_cache(job.prompt[:-1], checkpoint[0])
            self._store_cache(job.prompt + tokens, cache)
        elapsed = time.monotonic() - t0
        decode_s = elapsed - (ttft or 0.0)
        log.info(
            "request %s: prompt=%d cached=%d completion=%d finish=%s ttft=%.3fs decode=%.1f tok/s",
            job.id,
            total,
            job.cached_tokens,
            len(tokens),
            finish,
            ttft or 0.0,
            (len(tokens) - 1) / decode_s if decode_s > 0 and len(tokens) > 1 else 0.0,
        )
        self._finish(job, Done(finish, total, len(tokens), job.cached_tokens))

    def _store_cache(self, tokens: list[int], cache: list) -> None:
        if self._prompt_cache is None or self._prompt_cache.max_size <= 0:
            return
        # Only keep a cache that holds exactly these tokens (every yielded token was fed).
        offsets = {c.offset for c in cache if isinstance(getattr(c, "offset", None), int)}
        if offsets and offsets != {len(tokens)}:
            log.warning(
                "prompt cache not stored: cache offsets %s != %d tokens",
                sorted(offsets),
                len(tokens),
            )
            return
        try:
            self._prompt_cache.insert_cache(self.loaded.model_id, tokens, cache)
        except Exception as e:  # never fail a finished answer over its cache
            log.warning("prompt cache not stored (%s)", type(e).__name__)

    def _finish(self, job: Job, done: Done) -> None:
        job.state = "done" if done.finish_reason != "cancelled" else "cancelled"
        self.counters["cancelled" if done.finish_reason == "cancelled" else "completed"] += 1
        job.finished = True
        job.emit(done)

    # ----------------------------------------------------------------- limits and health

    def plan_max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """The completion budget for a prompt, or a 400 context_length_exceeded with numbers."""
        ctx = self.loaded.context_length
        if prompt_tokens == 0:
            raise APIError(400, "The prompt is empty.", param="messages", code="invalid_value")
        if requested is not None and prompt_tokens + requested > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, you "
                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                f"{requested} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if prompt_tokens >= ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, your "
                f"prompt has {prompt_tokens} tokens, leaving no room for a completion.",
                param="messages",
                code="context_length_exceeded",
            )
        limit = ctx
        budget_mb = self.settings.sidecar_kv_budget_mb
        per_token = max(1, self.backend.bytes_per_token_actual)
        fixed = int(getattr(self.backend, "fixed_bytes_actual", 0))  # full-precision sink etc.
        if budget_mb > 0:
            budget_tokens = max(0, budget_mb * 1024 * 1024 - fixed) // per_token
            need = prompt_tokens + (requested or 1)
            if need > budget_tokens:
                raise APIError(
                    400,
                    f"The KV cache for {need} tokens ({prompt_tokens} in the prompt, "
                    f"{requested or 1} for the completion) needs "
                    f"{(need * per_token + fixed) / 2**20:.1f} MiB at {per_token} bytes per "
                    "token; "
                    f"the sidecar's KV budget (SIDECAR_KV_BUDGET_MB) is {budget_mb} MiB, "
                    f"{budget_tokens} tokens.",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            limit = min(limit, budget_tokens)
        return requested if requested is not None else limit - prompt_tokens

    def _refresh_memory(self) -> None:
        import mlx.core as mx

        self._memory = {
            "mlx_active_bytes": int(mx.get_active_memory()),
            "mlx_peak_bytes": int(mx.get_peak_memory()),
            "mlx_cache_bytes": int(mx.get_cache_memory()),
        }

    def health(self) -> dict[str, Any]:
        """The /health body (status ``loading``/``failed`` until the model is ready)."""
        if not self.ready:
            body: dict[str, Any] = {"status": self.status, "model": None}
            if self.error:
                body["error"] = self.error
            return body
        with self._cond:
            active = [self._active] if self._active is not None else []
            pending = list(self._pending)
        b, lm = self.backend, self.loaded
        pc = self._prompt_cache
        return {
            "status": "ok",
            "model": lm.model_id,
            "architecture": b.kind,
            "context_length": lm.context_length,
            "dtype": lm.dtype,
            "num_layers": b.num_layers,
            "compressed_layers": b.compressed_layers,
            "cache": {
                **b.cache_config(),
                "kv_bytes_per_token_fp16": b.bytes_per_token_fp16,
                "kv_bytes_per_token_actual": b.bytes_per_token_actual,
                "patched_modules": b.patched_modules,
            },
            "active_requests": len(active),
            "queued_requests": len(pending),
            "max_queue": self.settings.sidecar_max_queue,
            "kv_budget_mb": self.settings.sidecar_kv_budget_mb,
            "requests": [j.describe() for j in active + pending],
            "memory": {
                **self._memory,
                "prompt_cache_entries": len(pc) if pc is not None else 0,
                "prompt_cache_bytes": int(pc.nbytes) if pc is not None else 0,
            },
            "counters": dict(self.counters),
        }
