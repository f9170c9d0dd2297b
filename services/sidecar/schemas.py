"""Request models for the sidecar's OpenAI endpoints and their translation to GenParams.

Pydantic validates types (a badly typed field becomes a 400 through
``services.errors``); unknown fields are accepted and ignored, as OpenAI clients send
many optional ones. Everything the engine needs ends up in one plain ``GenParams``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from services.errors import APIError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class _SamplingFields(_Lenient):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(default=None, ge=1)
    logprobs: StrictBool | int | None = None
    user: str | None = None
    # llama.cpp's extension: false = neither reuse nor keep this request's prompt cache.
    cache_prompt: StrictBool = True


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int]
    echo: StrictBool = False
    suffix: str | None = None


@dataclass
class GenParams:
    """Everything the engine needs to run one generation (no request content is logged)."""

    max_tokens: int | None = None  # None: up to the context limit
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    tools: list[dict[str, Any]] | None = None
    stream: bool = False
    include_usage: bool = False
    cache_prompt: bool = True


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(s == "" for s in stops):
        raise APIError(400, "'stop' strings must not be empty.", param="stop", code="invalid_value")
    return stops


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not raw:
        return None
    out: dict[int, float] = {}
    for k, v in raw.items():
        try:
            tok = int(k)
        except ValueError:
            raise APIError(
                400,
                f"logit_bias keys must be token ids, got {k!r}.",
                param="logit_bias",
                code="invalid_value",
            ) from None
        if not 0 <= tok < vocab_size:
            raise APIError(
                400,
                f"logit_bias token id {tok} is outside the vocabulary (0..{vocab_size - 1}).",
                param="logit_bias",
                code="invalid_value",
            )
        out[tok] = max(-100.0, min(100.0, float(v)))
    return out


def gen_params(req: _SamplingFields, vocab_size: int) -> GenParams:
    """Check what we do not support and turn a validated request into GenParams."""
    if req.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n", code="unsupported_value")
    if req.logprobs not in (None, False, 0):
        raise APIError(
            400,
            "logprobs are not supported by the sidecar.",
            param="logprobs",
            code="unsupported_value",
        )
    max_tokens = req.max_tokens
    tools = None
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        # Some clients (Open WebUI) send "tools": []; treat it as no tools.
        tools = req.tools or None
        if req.tool_choice == "none":
            tools = None
    temperature = 1.0 if req.temperature is None else req.temperature
    return GenParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        # mlx-lm's top-k rejects k >= vocabulary size; that many is no filter at all.
        top_k=req.top_k if req.top_k and req.top_k < vocab_size else 0,
        min_p=req.min_p or 0.0,
        stop=_stop_list(req.stop),
        seed=req.seed,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty or None,
        presence_penalty=req.presence_penalty or None,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        tools=tools,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        cache_prompt=req.cache_prompt,
    )


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "input_text"):
            parts.append(str(part.get("text", "")))
        else:
            raise APIError(
                400,
                f"Content part type {kind!r} is not supported (text only).",
                param=f"messages.{index}.content",
                code="unsupported_value",
            )
    return "".join(parts)


def _tool_call_for_template(tc: dict[str, Any]) -> dict[str, Any]:
    # Chat templates iterate over arguments as a mapping; OpenAI sends a JSON string.
    tc = json.loads(json.dumps(tc))
    fn = tc.get("function") or {}
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    return tc


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for ``tokenizer.apply_chat_template``."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": _text_of(m.content, i)}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [_tool_call_for_template(tc) for tc in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.reasoning_content:
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


Endpoint = Literal["chat", "completion"]
