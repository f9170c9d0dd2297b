"""A loopback Ollama: its ``/v1`` OpenAI layer and the native endpoints, as backends.md says.

Dialect kept exactly: role only in the first chunk, ``system_fingerprint: fp_ollama``,
ids ``chatcmpl-<0..998>`` that repeat, a separate finish chunk with ``delta: {}``, tool
calls whole in one chunk, a usage chunk (``choices: []``) only when asked, no ``usage`` key
on other chunks, then ``[DONE]``; ``max_completion_tokens`` silently ignored.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .base import FakeBackend, prompt_chars, words
from .sse import DONE, FakeStream, data

DEFAULT_MODELS = {"qwen3.5:35b-a3b-coding-nvfp4": 262144, "llama3.2:1b": 131072}


class FakeOllama(FakeBackend):
    """Fake Ollama. ``models``: tag -> trained context (``/api/show``); ``num_ctx``: the
    context a model gets when it loads (``/api/ps``)."""

    name = "ollama"

    def __init__(
        self,
        port: int | None = None,
        models: dict[str, int] | None = None,
        num_ctx: int = 4096,
        version: str = "0.33.0",
    ) -> None:
        self.models = dict(DEFAULT_MODELS if models is None else models)
        self.num_ctx = num_ctx
        self.version = version
        self.loaded: dict[str, int] = {}  # model -> context_length while loaded
        self._ids = itertools.cycle(range(999))
        super().__init__(port)

    # --- errors in Ollama's /v1 shape
    def error(self, status: int, message: str) -> Response:
        etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return JSONResponse(
            {"error": {"message": message, "type": etype, "param": None, "code": None}},
            status_code=status,
        )

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", self.api_version),
            Route("/api/tags", self.api_tags),
            Route("/api/ps", self.api_ps),
            Route("/api/show", self.api_show, methods=["POST"]),
            Route("/api/generate", self.api_generate, methods=["POST"]),
            Route("/v1/models", self.v1_models),
            Route("/v1/models/{model:path}", self.v1_model),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ]

    # --- native API
    async def root(self, request: Request) -> Response:
        await self.record(request)
        if self.faults.health_status:
            return PlainTextResponse("unhealthy", status_code=self.faults.health_status)
        return PlainTextResponse("Ollama is running")

    async def api_version(self, request: Request) -> Response:
        await self.record(request)
        if self.faults.health_status:
            return JSONResponse({"error": "unhealthy"}, status_code=self.faults.health_status)
        return JSONResponse({"version": self.version})

    def _details(self) -> dict[str, Any]:
        return {
            "format": "gguf",
            "family": "qwen35moe",
            "parameter_size": "35B",
            "quantization_level": "Q4_K_M",
        }

    async def api_tags(self, request: Request) -> Response:
        await self.record(request)
        return JSONResponse(
            {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "modified_at": "2026-01-01T00:00:00Z",
                        "size": 1 << 30,
                        "digest": uuid.uuid5(uuid.NAMESPACE_DNS, m).hex,
                        "details": self._details(),
                    }
                    for m in self.models
                ]
            }
        )

    async def api_ps(self, request: Request) -> Response:
        await self.record(request)
        return JSONResponse(
            {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "size": 1 << 30,
                        "size_vram": 1 << 30,
                        "digest": uuid.uuid5(uuid.NAMESPACE_DNS, m).hex,
                        "details": self._details(),
                        "expires_at": "2030-01-01T00:00:00Z",
                        "context_length": ctx,
                    }
                    for m, ctx in self.loaded.items()
                ]
            }
        )

    async def api_show(self, request: Request) -> Response:
        body = await self.record(request) or {}
        m = body.get("model") or body.get("name")
        if m not in self.models:
            return JSONResponse({"error": f"model '{m}' not found"}, status_code=404)
        return JSONResponse(
            {
                "modelfile": f"FROM {m}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": self._details(),
                "model_info": {
                    "general.architecture": "qwen35moe",
                    "qwen35moe.context_length": self.models[m],
                    "qwen35moe.embedding_length": 2048,
                },
                "capabilities": ["completion", "tools"],
            }
        )

    async def api_generate(self, request: Request) -> Response:
        body = await self.record(request) or {}
        m = body.get("model")
        if m not in self.models:
            return JSONResponse({"error": f"model '{m}' not found"}, status_code=404)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if body.get("keep_alive") == 0 and not body.get("prompt"):
            self.loaded.pop(m, None)
            return JSONResponse(
                {
                    "model": m,
                    "created_at": now,
                    "response": "",
                    "done": True,
                    "done_reason": "unload",
                }
            )
        self.loaded[m] = self.num_ctx
        return JSONResponse(
            {"model": m, "created_at": now, "response": "ok", "done": True, "done_reason": "stop"}
        )

    # --- /v1
    def _model_entry(self, m: str) -> dict[str, Any]:
        return {"id": m, "object": "model", "created": 1767225600, "owned_by": "library"}

    async def v1_models(self, request: Request) -> Response:
        await self.record(request)
        entries = [self._model_entry(m) for m in self.models]
        return JSONResponse({"object": "list", "data": entries or None})

    async def v1_model(self, request: Request) -> Response:
        await self.record(request)
        m = request.path_params["model"]
        if m not in self.models:
            return self.error(404, f"model '{m}' not found")
        return JSONResponse(self._model_entry(m))

    def _check(self, body: Any) -> Response | str:
        if not isinstance(body, dict):
            return self.error(400, "invalid request body")
        m = body.get("model")
        if m not in self.models:
            return self.error(404, f"model '{m}' not found")
        self.loaded.setdefault(m, self.num_ctx)
        return m

    def _base(self, obj: str, model: str) -> dict[str, Any]:
        return {
            "id": f"{'chatcmpl' if 'chat' in obj else 'cmpl'}-{next(self._ids)}",
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_ollama",
        }

    def _tool_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        tools = body.get("tools")
        if not tools:
            return None
        fn = tools[0].get("function", {})
        return {
            "id": "call_" + uuid.uuid4().hex[:8],
            "index": 0,
            "type": "function",
            "function": {
                "name": fn.get("name", "tool"),
                "arguments": json.dumps({"city": "Paris"}),
            },
        }

    def _usage(self, body: dict[str, Any], n: int) -> dict[str, int]:
        p = prompt_chars(body) // 4 + 1
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    async def chat(self, request: Request) -> Response:
        body = await self.record(request)
        checked = self._check(body)
        if isinstance(checked, Response):
            return checked
        model = checked
        fault = await self.generation_faults(request)
        if fault is not None:
            return fault
        pieces = words(self.faults.reply_tokens)
        if body.get("max_tokens"):
            pieces = pieces[: body["max_tokens"]]
        call = self._tool_call(body)
        finish = (
            "tool_calls"
            if call
            else ("length" if len(pieces) < self.faults.reply_tokens else "stop")
        )
        base = self._base(
            "chat.completion.chunk" if body.get("stream") else "chat.completion", model
        )
        if not body.get("stream"):
            msg: dict[str, Any] = {"role": "assistant", "content": "" if call else "".join(pieces)}
            if call:
                msg["tool_calls"] = [{k: v for k, v in call.items() if k != "index"}]
            return JSONResponse(
                {
                    **base,
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                    "usage": self._usage(body, len(pieces)),
                }
            )
        events: list[bytes] = []
        if call:
            events.append(
                data(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": "", "tool_calls": [call]},
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            )
        else:
            for i, p in enumerate(pieces):
                delta = {"role": "assistant", "content": p} if i == 0 else {"content": p}
                events.append(
                    data({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                )
        events.append(
            data({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(data({**base, "choices": [], "usage": self._usage(body, len(pieces))}))
        events.append(DONE)
        return FakeStream(events, self.faults, self.journal)

    async def completions(self, request: Request) -> Response:
        body = await self.record(request)
        checked = self._check(body)
        if isinstance(checked, Response):
            return checked
        fault = await self.generation_faults(request)
        if fault is not None:
            return fault
        return self.text_completion(body, self._base("text_completion", checked))

    async def embeddings(self, request: Request) -> Response:
        body = await self.record(request)
        checked = self._check(body)
        if isinstance(checked, Response):
            return checked
        fault = await self.generation_faults(request)
        if fault is not None:
            return fault
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return JSONResponse(
            {
                "object": "list",
                "model": checked,
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                    for i in range(len(inputs))
                ],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            }
        )
