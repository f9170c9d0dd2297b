"""The routing decision: model prefixes, prompt-token estimate, context fit (pure functions).

Nothing here does I/O; the app gathers the facts (backend health, learned context lengths,
the threshold in force) and :func:`decide` turns them into a :class:`RouteDecision`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

Backend = Literal["ollama", "sidecar"]
Reason = Literal["prefix", "auto-short", "auto-long", "fallback", "context"]

OLLAMA: Backend = "ollama"
SIDECAR: Backend = "sidecar"
BACKENDS: tuple[Backend, Backend] = (OLLAMA, SIDECAR)

SIDECAR_PREFIXES = ("tq:", "turbo:", "sidecar:")
OLLAMA_PREFIXES = ("ollama:", "local:")

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_CHARS = 40  # role markers and separators the chat template adds per message
IMAGE_TOKENS = 768  # a typical vision encoder's tokens per image; base64 length says nothing

THRESHOLD_PURE_SDPA = 6000
THRESHOLD_HYBRID = 16000
# Placeholder model names meaning "whatever the backend serves by default".
AUTO_NAMES = frozenset({"", "auto", "default"})


def other(backend: Backend) -> Backend:
    """The backend that is not ``backend``."""
    return SIDECAR if backend == OLLAMA else OLLAMA


@dataclass(frozen=True)
class ModelTarget:
    """A request's ``model`` split into a forced backend (or None) and the name after it."""

    forced: Backend | None
    name: str


def parse_model(model: str) -> ModelTarget:
    """Split a prefix (``tq:``, ``ollama:``...) off ``model``; no prefix means auto-routing.

    Ollama tags contain colons themselves (``qwen3.5:35b``), so only the known prefixes
    count as prefixes.
    """
    low = model.lower()
    for p in SIDECAR_PREFIXES:
        if low.startswith(p):
            return ModelTarget(SIDECAR, model[len(p) :].strip())
    for p in OLLAMA_PREFIXES:
        if low.startswith(p):
            return ModelTarget(OLLAMA, model[len(p) :].strip())
    return ModelTarget(None, model.strip())


def _content_chars(content: Any) -> tuple[int, int]:
    """(characters, image count) of a message ``content``: a string or a list of parts."""
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return len(content), 0
    if isinstance(content, list):
        chars = images = 0
        for part in content:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind in ("image_url", "input_image", "image"):
                    images += 1
                elif isinstance(part.get("text"), str):
                    chars += len(part["text"])
                else:  # input_audio, file...: count what would be serialised
                    chars += len(json.dumps(part, separators=(",", ":")))
        return chars, images
    return len(json.dumps(content, separators=(",", ":"))), 0


def estimate_chars(messages: list[Any], tools: list[Any] | None = None) -> tuple[int, int]:
    """(characters, images) a chat prompt will take once templated."""
    chars = images = 0
    for m in messages:
        chars += MESSAGE_OVERHEAD_CHARS
        if not isinstance(m, dict):
            chars += len(str(m))
            continue
        c, i = _content_chars(m.get("content"))
        chars += c
        images += i
        for key in ("name", "tool_call_id", "reasoning_content", "reasoning"):
            if isinstance(m.get(key), str):
                chars += len(m[key])
        for call in m.get("tool_calls") or ():
            # the template re-serialises calls: name plus the JSON arguments
            chars += len(json.dumps(call, separators=(",", ":")))
    if tools:
        chars += len(json.dumps(tools, separators=(",", ":")))
    return chars, images


def estimate_chat_tokens(messages: list[Any], tools: list[Any] | None = None) -> int:
    """Prompt tokens of a chat request: ~4 chars/token + ~40 chars template per message."""
    chars, images = estimate_chars(messages, tools)
    return math.ceil(chars / CHARS_PER_TOKEN) + images * IMAGE_TOKENS


def estimate_completion_tokens(prompt: Any) -> int:
    """Prompt tokens of a legacy ``/v1/completions`` prompt (string, strings or token ids)."""
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        return math.ceil(len(prompt) / CHARS_PER_TOKEN)
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)  # already token ids
        return max((estimate_completion_tokens(p) for p in prompt), default=0)
    return math.ceil(len(str(prompt)) / CHARS_PER_TOKEN)


def threshold_for(setting: int | str, architecture: str | None) -> tuple[int, str]:
    """(threshold, source): a number from config wins; ``auto`` follows the sidecar model."""
    if not isinstance(setting, str):
        return int(setting), "config"
    if architecture == "hybrid":
        return THRESHOLD_HYBRID, "sidecar:hybrid"
    if architecture == "pure_sdpa":
        return THRESHOLD_PURE_SDPA, "sidecar:pure_sdpa"
    return THRESHOLD_PURE_SDPA, "default"  # sidecar not seen yet: the conservative value


@dataclass(frozen=True)
class BackendView:
    """What the router knows about one backend when deciding."""

    available: bool = True  # False only when health says down (unknown counts as available)
    context_length: int | None = None  # None: not learned (then assume it fits)

    def fits(self, needed: int) -> bool:
        return self.context_length is None or needed <= self.context_length


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes, why, and where it may fall back to before the first byte."""

    backend: Backend
    reason: Reason
    target: ModelTarget
    prompt_tokens: int
    needed_tokens: int
    alternate: Backend | None  # tried on connection failure; None when it cannot take it


class RoutingError(Exception):
    """No backend can take the request; carries the HTTP status and an error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def decide(
    model: str,
    prompt_tokens: int,
    max_tokens: int | None,
    threshold: int,
    views: dict[Backend, BackendView],
) -> RouteDecision:
    """Choose the backend for one request.

    Order: a prefix forces a backend, else prompts at or over ``threshold`` go to the
    sidecar. A prompt (plus ``max_tokens``) that does not fit the chosen backend's context
    goes where it fits (reason ``context``) -- Ollama would silently truncate it. A chosen
    backend that health says is down is swapped for the other (reason ``fallback``).
    Raises :class:`RoutingError` when it fits nowhere or nowhere available.
    """
    target = parse_model(model)
    needed = prompt_tokens + max(0, max_tokens or 0)
    if target.forced is not None:
        backend, reason = target.forced, "prefix"
    elif prompt_tokens >= threshold:
        backend, reason = SIDECAR, "auto-long"
    else:
        backend, reason = OLLAMA, "auto-short"

    alt = other(backend)
    if not views[backend].fits(needed):
        if not views[alt].fits(needed):
            sizes = ", ".join(
                f"{b} {views[b].context_length}" for b in BACKENDS if views[b].context_length
            )
            raise RoutingError(
                400,
                "context_length_exceeded",
                f"This request needs about {needed} tokens ({prompt_tokens} prompt + "
                f"{needed - prompt_tokens} max_tokens), more than any backend's context "
                f"window ({sizes}). Shorten the messages or lower max_tokens.",
            )
        if not views[alt].available:
            raise RoutingError(
                503,
                "backend_unavailable",
                f"This request needs about {needed} tokens; only the {alt} backend has room "
                f"for it and it is down.",
            )
        return RouteDecision(alt, "context", target, prompt_tokens, needed, None)

    alt_ok = views[alt].fits(needed)
    if not views[backend].available and views[alt].available and alt_ok:
        return RouteDecision(alt, "fallback", target, prompt_tokens, needed, backend)
    return RouteDecision(backend, reason, target, prompt_tokens, needed, alt if alt_ok else None)


def upstream_model(
    backend: Backend, target: ModelTarget, *, ollama_default: str, sidecar_model: str | None
) -> str:
    """The ``model`` value to send to ``backend`` for a request that asked for ``target``.

    The sidecar gets its exact loaded id. Ollama gets the tag the client named, unless it
    named the sidecar (or nothing), in which case it gets the configured default tag.
    """
    if backend == SIDECAR:
        return sidecar_model or (target.name if target.name.lower() not in AUTO_NAMES else "auto")
    if target.forced == SIDECAR or target.name.lower() in AUTO_NAMES:
        return ollama_default
    if sidecar_model and target.name == sidecar_model:
        return ollama_default
    return target.name
