"""Turn streamed model text into OpenAI deltas: stop strings, reasoning, tool calls.

Pure Python (no MLX), so it runs in the engine worker per token and is tested on its
own with crafted model output. Reasoning and tool-call markers are split with
mlx-lm's ``TextStateMachine``; tool-call bodies are parsed with the tokenizer's
mlx-lm tool parser (``mlx_lm.tool_parsers.*.parse_tool_call``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine

log = logging.getLogger("tqstack.sidecar")


@dataclass
class Delta:
    """One piece of an answer: visible text, reasoning text or parsed tool calls."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass
class Markers:
    """Where reasoning and tool calls start and end in a model's output."""

    think_start: str | None = None
    think_end: str | None = None
    tool_start: str | None = None
    tool_end: str | None = None
    tool_parser: Callable[[str, Any], Any] | None = None
    initial_state: str = "normal"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, prompt: list[int] | None = None) -> Markers:
        """Markers of an mlx-lm ``TokenizerWrapper``; ``prompt`` decides if we start thinking."""
        m = cls()
        if getattr(tokenizer, "has_thinking", False):
            m.think_start, m.think_end = tokenizer.think_start, tokenizer.think_end
            # A template that opens <think> in the prompt makes the answer start in reasoning.
            if prompt is not None and tokenizer.think_start_tokens:
                start = tokenizer.rfind_think_start(prompt)
                end = tokenizer.rfind_think_end(prompt)
                if start is not None and start >= 0 and start > (end if end is not None else -1):
                    m.initial_state = "reasoning"
        if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_parser is not None:
            m.tool_start, m.tool_end = tokenizer.tool_call_start, tokenizer.tool_call_end
            m.tool_parser = tokenizer.tool_parser
        return m


class StopFilter:
    """Cut text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; sets ``stopped`` when a stop string appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[: min(hits)]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return "" if self.stopped else out


class OutputParser:
    """Feed decoded text segments; get back :class:`Delta` objects in OpenAI shape."""

    def __init__(self, markers: Markers, stops: list[str], tools: list[dict] | None) -> None:
        self.markers = markers
        self.stop = StopFilter(stops)
        self.tools = tools
        transitions: dict[str, list[tuple[str, str]]] = {}
        if markers.think_start and markers.think_end:
            transitions["normal"] = [(markers.think_start, "reasoning")]
            transitions["reasoning"] = [(markers.think_end, "normal")]
        # Tool markers are only special when the request offered tools.
        if tools and markers.tool_start and markers.tool_parser is not None:
            transitions.setdefault("normal", []).append((markers.tool_start, "tool"))
            if "reasoning" in transitions:
                transitions["reasoning"].append((markers.tool_start, "tool"))
            transitions["tool"] = [(markers.tool_end, "normal")] if markers.tool_end else []
        self._sm = TextStateMachine(transitions or None)
        self._state = self._sm.make_state(markers.initial_state)
        self._tool_text = ""
        self._n_tools = 0
        self.made_tool_call = False

    @property
    def stopped(self) -> bool:
        """True once a stop string was produced: the caller ends generation."""
        return self.stop.stopped

    def feed(self, text: str) -> Delta:
        """Consume one decoded segment of model output."""
        safe = self.stop.feed(text)
        self._state, segments = TextStateMachine.split(self._state, safe)
        return self._collect(segments)

    def finish(self) -> Delta:
        """Flush everything held back at the end of generation."""
        tail = self.stop.flush()
        self._state, segments = TextStateMachine.split(self._state, tail)
        self._state, rest, state = TextStateMachine.flush(self._state)
        segments.append((state, rest))
        delta = self._collect(segments)
        if self._tool_text.strip():
            # An unterminated tool call (format without an end marker, or cut short).
            self._close_tool(delta)
        return delta

    def _collect(self, segments: list[tuple[str | None, str]]) -> Delta:
        delta = Delta()
        for state, text in segments:
            if state == "tool":
                self._tool_text += text
                continue
            if self._tool_text:
                self._close_tool(delta)
            if state == "reasoning":
                delta.reasoning += text
            else:
                delta.content += text
        # A segment list that left the tool state ends with a non-tool state entry.
        return delta

    def _close_tool(self, delta: Delta) -> None:
        text, self._tool_text = self._tool_text, ""
        calls = self._parse_tool(text)
        if calls is None:
            # Unparseable: give the text back rather than lose it.
            start = self.markers.tool_start or ""
            delta.content += start + text + (self.markers.tool_end or "")
            return
        for call in calls:
            delta.tool_calls.append(self._format(call))
        self.made_tool_call = True

    def _parse_tool(self, text: str) -> list[dict] | None:
        try:
            parsed = self.markers.tool_parser(text, self.tools)  # type: ignore[misc]
        except Exception as e:  # parsers raise ValueError, JSONDecodeError, KeyError...
            log.warning("could not parse a tool call (%s)", type(e).__name__)
            return None
        calls = parsed if isinstance(parsed, list) else [parsed]
        if not all(isinstance(c, dict) and c.get("name") for c in calls):
            return None
        return calls

    def _format(self, call: dict) -> dict[str, Any]:
        args = call.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out = {
            "index": self._n_tools,
            "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": args},
        }
        self._n_tools += 1
        return out
