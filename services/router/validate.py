"""Read and check a client's request body; every mistake becomes a clear OpenAI 400/413."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request

from services.errors import APIError

from .auth import request_too_large

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code, component="router", should_retry=False)


def _no_constant(name: str) -> None:
    # Python accepts NaN/Infinity, which are not JSON: forwarded, they break the backend
    raise ValueError(f"{name} is not a valid JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf, which re-serialises as Infinity
        raise ValueError(f"number {text[:20]} is out of range")
    return value


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, enforcing ``limit`` bytes even without Content-Length."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise request_too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("Request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:  # json recurses per nesting level: deep input must not be a 500
        raise bad_request("Request body is nested too deeply.", code="invalid_json") from None
    except ValueError as e:
        raise bad_request(f"Request body is not valid JSON ({e}).", code="invalid_json") from e
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.", code="invalid_json")
    return body


def _check_common(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        raise bad_request(
            "You must provide a 'model' parameter.", "model", "missing_required_parameter"
        )
    if not isinstance(model, str):
        # an empty string is allowed: it means "auto", like "auto" and "default"
        raise bad_request("'model' must be a string.", "model")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be a boolean.", "stream")
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad_request(f"'{key}' must be a positive integer.", key)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise bad_request(f"'{key}' must be a number.", key)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")


def check_chat(body: dict[str, Any]) -> None:
    """Validate a ``/v1/chat/completions`` body enough to route it safely."""
    _check_common(body)
    messages = body.get("messages")
    if messages is None:
        raise bad_request("You must provide 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be an array of message objects.", "messages")
    if not messages:
        raise bad_request("'messages' must contain at least one message.", "messages")
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{p}' must be an object.", p)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"'{p}.role' must be one of {', '.join(sorted(ROLES))}.", f"{p}.role")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(
                f"'{p}.content' must be a string or an array of parts.", f"{p}.content"
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise bad_request(
                        f"'{p}.content[{j}]' must be an object with a 'type'.", f"{p}.content[{j}]"
                    )
        if (
            "tool_calls" in m
            and m["tool_calls"] is not None
            and not isinstance(m["tool_calls"], list)
        ):
            raise bad_request(f"'{p}.tool_calls' must be an array.", f"{p}.tool_calls")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise bad_request("'tools' must be an array of tool objects.", "tools")


def check_completion(body: dict[str, Any]) -> None:
    """Validate a legacy ``/v1/completions`` body."""
    _check_common(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("You must provide 'prompt'.", "prompt", "missing_required_parameter")
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list)
        and all(
            isinstance(p, (str, int))
            and not isinstance(p, bool)
            or (isinstance(p, list) and all(isinstance(t, int) for t in p))
            for p in prompt
        )
    )
    if not ok:
        raise bad_request(
            "'prompt' must be a string, an array of strings or of token ids.", "prompt"
        )


def check_embeddings(body: dict[str, Any]) -> None:
    """Validate a ``/v1/embeddings`` body."""
    _check_common(body)
    inp = body.get("input")
    if inp is None:
        raise bad_request("You must provide 'input'.", "input", "missing_required_parameter")
    ok = isinstance(inp, str) or (
        isinstance(inp, list) and bool(inp) and all(isinstance(x, (str, int, list)) for x in inp)
    )
    if not ok:
        raise bad_request("'input' must be a string or a non-empty array.", "input")
