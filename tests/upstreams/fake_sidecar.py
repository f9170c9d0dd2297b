"""A loopback tqstack sidecar speaking the contract in docs/DESIGN.md (Sidecar HTTP).

``/health`` is 503 ``{"status": "loading"}`` until ready, then 200 with model,
architecture, context_length...; generation answers with the loaded model whatever
``model`` says. Streams put ``role`` in the first chunk, then content, a finish chunk, a
usage chunk when asked, ``[DONE]``. ``mlx_errors=True`` answers errors like mlx-lm's own
server does (``{"error": "<text>"}`` with 404), the pitfall the router must rewrite.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .base import FakeBackend, prompt_chars, words
from .sse import DONE, FakeStream, data


class FakeSidecar(FakeBackend):
    """Fake sidecar serving one ``model`` of ``architecture`` with ``context_length``."""

    name = "sidecar"

    def __init__(
        self,
        port: int | None = None,
        model: str = "mlx-community/SmolLM2-135M",
        architecture: str = "pure_sdpa",
        context_length: int = 32768,
        loading: bool = False,
        mlx_errors: bool = False,
    ) -> None:
        self.model = model
        self.architecture = architecture
        self.context_length = context_length
        self.loading = loading
        self.mlx_errors = mlx_errors
        self.active = 0
        super().__init__(port)

    def error(self, status: int, message: str) -> Response:
        if self.mlx_errors:
            return JSONResponse({"error": message}, status_code=404)
        etype = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(
            {
                "error": {
                    "message": message,
                    "type": etype,
                    "param": None,
                    "code": None,
                    "component": "sidecar",
                }
            },
            status_code=status,
        )

    def not_ready(self) -> Response:
        """503 ``model_not_ready`` while loading, as the contract says."""
        return JSONResponse(
            {
                "error": {
                    "message": "model is loading",
                    "type": "server_error",
                    "param": None,
                    "code": "model_not_ready",
                    "component": "sidecar",
                }
            },
            status_code=503,
            headers={"retry-after": "5"},
        )

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health),
            Route("/v1/models", self.v1_models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]

    async def health(self, request: Request) -> Response:
        await self.record(request)
        if self.loading:
            return JSONResponse({"status": "loading", "model": self.model}, status_code=503)
        if self.faults.health_status:
            return JSONResponse({"status": "error"}, status_code=self.faults.health_status)
        n_layers = 30
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model,
                "architecture": self.architecture,
                "context_length": self.context_length,
                "compressed_layers": list(range(n_layers))
                if self.architecture == "pure_sdpa"
                else list(range(3, n_layers, 4)),
                "cache": {"key_bits": 4, "value_bits": 4, "group_size": 64},
                "active_requests": self.journal.active_streams,
                "queued_requests": 0,
                "requests": [],
                "memory": {"kv_actual_bytes": 0},
            }
        )

    async def v1_models(self, request: Request) -> Response:
        await self.record(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": 1767225600,
                        "owned_by": "tqstack",
                        "context_length": self.context_length,
                    }
                ],
            }
        )

    def _base(self, obj: str) -> dict[str, Any]:
        prefix = "chatcmpl" if "chat" in obj else "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model,
        }

    def _usage(self, body: dict[str, Any], n: int) -> dict[str, int]:
        p = prompt_chars(body) // 4 + 1
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    async def chat(self, request: Request) -> Response:
        body = await self.record(request)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self.error(400, "'messages' is required")
        if self.loading:
            return self.not_ready()
        fault = await self.generation_faults(request)
        if fault is not None:
            return fault
        pieces = words(self.faults.reply_tokens)
        if body.get("max_tokens"):
            pieces = pieces[: body["max_tokens"]]
        tools = body.get("tools")
        call = None
        if tools:
            call = {
                "index": 0,
                "id": "call_" + uuid.uuid4().hex[:12],
                "type": "function",
                "function": {
                    "name": tools[0].get("function", {}).get("name", "tool"),
                    "arguments": json.dumps({"city": "Paris"}),
                },
            }
        finish = "tool_calls" if call else "stop"
        stream = bool(body.get("stream"))
        base = self._base("chat.completion.chunk" if stream else "chat.completion")
        if not stream:
            msg: dict[str, Any] = {
                "role": "assistant",
                "content": None if call else "".join(pieces),
            }
            if call:
                msg["tool_calls"] = [{k: v for k, v in call.items() if k != "index"}]
            return JSONResponse(
                {
                    **base,
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                    "usage": self._usage(body, len(pieces)),
                }
            )
        events = [
            data(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ],
                    "usage": None,
                }
            )
        ]
        if call:
            events.append(
                data(
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
                        ],
                        "usage": None,
                    }
                )
            )
        else:
            events += [
                data(
                    {
                        **base,
                        "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}],
                        "usage": None,
                    }
                )
                for p in pieces
            ]
        events.append(
            data(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                    "usage": None,
                }
            )
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(data({**base, "choices": [], "usage": self._usage(body, len(pieces))}))
        events.append(DONE)
        prelude = [
            f": keepalive {i + 1}/{self.faults.keepalive_comments}\n\n".encode()
            for i in range(self.faults.keepalive_comments)
        ]
        return FakeStream(events, self.faults, self.journal, prelude=prelude)

    async def completions(self, request: Request) -> Response:
        body = await self.record(request)
        if not isinstance(body, dict) or "prompt" not in body:
            return self.error(400, "'prompt' is required")
        fault = await self.generation_faults(request)
        if fault is not None:
            return fault
        return self.text_completion(body, self._base("text_completion"))
