"""The sidecar's FastAPI app: OpenAI-compatible endpoints in front of the MLX engine.

Handlers validate, tokenize (in a thread: the tokenizer is not MLX), check the context
and KV limits, then queue a job to the engine and relay its events as one JSON answer or
as an OpenAI SSE stream (role chunk, deltas, finish chunk, optional usage chunk,
``[DONE]``; ``: keepalive`` comments while the prompt is processed or the job waits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from services.errors import APIError, install_error_handlers
from services.sidecar.engine import Done, Engine, Failed, Job, Progress
from services.sidecar.output import Delta
from services.sidecar.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenParams,
    gen_params,
    template_messages,
)

log = logging.getLogger("tqstack.sidecar")

M = TypeVar("M", bound=BaseModel)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _JobStream(StreamingResponse):
    """A stream that cancels its job however it ends (client gone, error, done)."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def create_app(settings: Any, engine: Engine | None = None) -> FastAPI:
    """Build the sidecar app; ``engine`` defaults to a real MLX engine started on startup."""
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if engine._thread is None:
            engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="tqstack sidecar", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app, "sidecar")

    @app.get("/health")
    async def health() -> JSONResponse:
        body = engine.health()
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        _require_ready(engine)
        lm = engine.loaded
        return {
            "object": "list",
            "data": [
                {
                    "id": lm.model_id,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "tqstack-sidecar",
                    "context_length": lm.context_length,
                    "architecture": engine.backend.kind,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        _require_ready(engine)
        params = gen_params(body, _vocab_size(engine))
        messages = template_messages(body.messages)
        prompt = await anyio.to_thread.run_sync(
            _chat_tokens, engine, messages, params.tools, body.chat_template_kwargs
        )
        return await _serve(engine, request, "chat", prompt, params)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        _require_ready(engine)
        params = gen_params(body, _vocab_size(engine))
        if body.echo or body.suffix:
            raise APIError(400, "'echo' and 'suffix' are not supported.", code="unsupported_value")
        prompt = await anyio.to_thread.run_sync(_text_tokens, engine, body.prompt)
        return await _serve(engine, request, "completion", prompt, params)

    return app


async def _parse(request: Request, model: type[M]) -> M:
    """Validate a JSON body whatever its content type (curl -d sends a form type)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "Request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "Request body must be a JSON object.", code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # The shared handler turns this into a 400 naming the offending field.
        raise RequestValidationError(e.errors()) from None


def _require_ready(engine: Engine) -> None:
    if not engine.ready:
        raise APIError(
            503,
            f"The sidecar model is {engine.status}.",
            code="model_not_ready",
            headers={"Retry-After": "2"},
        )


def _vocab_size(engine: Engine) -> int:
    return int(len(engine.loaded.tokenizer))


def _chat_tokens(
    engine: Engine,
    messages: list[dict],
    tools: list[dict] | None,
    template_kwargs: dict[str, Any] | None,
) -> list[int]:
    tok = engine.loaded.tokenizer
    with engine.tokenizer_lock:
        if not tok.has_chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return list(tok.encode(text))
        try:
            ids = tok.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=True,
                tokenize=True,
                **(template_kwargs or {}),
            )
        except Exception as e:  # jinja raise_exception(), missing fields, bad kwargs
            raise APIError(
                400,
                f"The chat template rejected the messages: {e}",
                param="messages",
                code="invalid_value",
            ) from None
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _text_tokens(engine: Engine, prompt: str | list[str] | list[int]) -> list[int]:
    tok = engine.loaded.tokenizer
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = len(tok)
        if any(not 0 <= t < vocab for t in prompt):  # type: ignore[operator]
            raise APIError(
                400,
                f"Prompt token ids must be in 0..{vocab - 1}.",
                param="prompt",
                code="invalid_value",
            )
        return [int(t) for t in prompt]  # type: ignore[arg-type]
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(
                400,
                "Exactly one prompt per request is supported.",
                param="prompt",
                code="unsupported_value",
            )
        prompt = prompt[0]
    with engine.tokenizer_lock:
        return list(tok.encode(prompt))


async def _serve(engine: Engine, request: Request, kind: str, prompt: list[int], params: GenParams):
    max_tokens = engine.plan_max_tokens(len(prompt), params.max_tokens)
    job = Job(
        prompt=prompt,
        params=params,
        max_tokens=max_tokens,
        loop=asyncio.get_running_loop(),
        text_completion=kind == "completion",
    )
    rid = request.headers.get("x-request-id") or job.id
    engine.submit(job)
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    answer = _Answer(kind, f"{prefix}{job.id}", engine.loaded.model_id)
    headers = {"x-request-id": rid}
    if params.stream:
        return _JobStream(
            _sse(engine, job, answer, params.include_usage),
            on_close=lambda: engine.cancel(job),
            headers={**SSE_HEADERS, **headers},
        )
    try:
        body = await _collect(engine, job, answer, request)
    finally:
        engine.cancel(job)  # no-op when finished; stops work if we were cancelled
    return JSONResponse(body, headers=headers)


class _Answer:
    """Builds chat or text-completion objects and chunks for one job."""

    def __init__(self, kind: str, id: str, model: str) -> None:
        self.kind, self.id, self.model = kind, id, model
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "tqstack-sidecar",
        }

    @staticmethod
    def usage(done: Done) -> dict[str, Any]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        }

    def chunk(
        self, delta: Delta | None, finish: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        out = self._base(chunk=True)
        if self.kind == "chat":
            d: dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
                d["content"] = ""
            if delta is not None:
                if delta.reasoning:
                    d["reasoning_content"] = delta.reasoning
                if delta.content:
                    d["content"] = delta.content
                if delta.tool_calls:
                    d["tool_calls"] = delta.tool_calls
            out["choices"] = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]
        else:
            text = (delta.content if delta is not None else "") or ""
            out["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
        return out

    def final(
        self, content: str, reasoning: str, tool_calls: list[dict], done: Done
    ) -> dict[str, Any]:
        out = self._base(chunk=False)
        if self.kind == "chat":
            msg: dict[str, Any] = {
                "role": "assistant",
                "content": content if content or not tool_calls else None,
            }
            if reasoning:
                msg["reasoning_content"] = reasoning
            if tool_calls:
                msg["tool_calls"] = [
                    {k: v for k, v in tc.items() if k != "index"} for tc in tool_calls
                ]
            out["choices"] = [
                {"index": 0, "message": msg, "logprobs": None, "finish_reason": done.finish_reason}
            ]
        else:
            out["choices"] = [
                {"index": 0, "text": content, "logprobs": None, "finish_reason": done.finish_reason}
            ]
        out["usage"] = self.usage(done)
        return out


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _sse(
    engine: Engine, job: Job, answer: _Answer, include_usage: bool
) -> AsyncIterator[bytes]:
    keepalive = max(0.05, float(engine.settings.sidecar_keepalive_s))
    extra = {"usage": None} if include_usage else {}

    def data(obj: dict[str, Any]) -> bytes:
        return _data({**obj, **extra})

    if answer.kind == "chat":
        yield data(answer.chunk(None, role=True))
    last = time.monotonic()
    while True:
        try:
            ev = await asyncio.wait_for(job.events.get(), timeout=keepalive)
        except asyncio.TimeoutError:
            # Comments keep clients and proxies from timing out while the prompt is processed.
            last = time.monotonic()
            yield f": keepalive {job.state}\n\n".encode()
            continue
        if isinstance(ev, Progress):
            if time.monotonic() - last >= keepalive:
                last = time.monotonic()
                yield f": keepalive {ev.processed}/{ev.total}\n\n".encode()
            continue
        if isinstance(ev, Delta):
            last = time.monotonic()
            yield data(answer.chunk(ev))
            continue
        if isinstance(ev, Failed):
            yield ev.error.sse_event()
            return
        if isinstance(ev, Done):
            if ev.finish_reason == "cancelled":
                return
            yield data(answer.chunk(Delta(), ev.finish_reason))
            if include_usage:
                usage_chunk = {**answer._base(chunk=True), "choices": [], "usage": answer.usage(ev)}
                yield _data(usage_chunk)
            yield b"data: [DONE]\n\n"
            return


async def _collect(engine: Engine, job: Job, answer: _Answer, request: Request) -> dict[str, Any]:
    content, reasoning, calls = [], [], []
    next_check = time.monotonic() + 0.5
    while True:
        # Look for a gone client every 0.5 s even while tokens keep arriving: a fast decode
        # never leaves the queue empty long enough for the timeout branch alone to notice.
        try:
            ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            ev = None
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + 0.5
            if await request.is_disconnected():
                engine.cancel(job)
                raise APIError(499, "Client disconnected.", code="client_disconnected") from None
        if ev is None:
            continue
        if isinstance(ev, Delta):
            content.append(ev.content)
            reasoning.append(ev.reasoning)
            calls.extend(ev.tool_calls)
        elif isinstance(ev, Failed):
            raise ev.error
        elif isinstance(ev, Done):
            if ev.finish_reason == "cancelled":
                raise APIError(499, "Request cancelled.", code="cancelled")
            return answer.final("".join(content), "".join(reasoning), calls, ev)
