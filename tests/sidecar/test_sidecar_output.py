"""Sidecar output parsing on mlx-lm's real tool parsers and state machine, crafted output."""

from __future__ import annotations

import json

import mlx_lm.tool_parsers.json_tools as json_tools
import mlx_lm.tool_parsers.qwen3_coder as qwen3_coder
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sidecar.output import Delta, Markers, OutputParser, StopFilter

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

JSON_MARKERS = Markers(
    think_start="<think>",
    think_end="</think>",
    tool_start=json_tools.tool_call_start,
    tool_end=json_tools.tool_call_end,
    tool_parser=json_tools.parse_tool_call,
)

OUTPUT = (
    "<think>The user wants weather.</think>Let me check. <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


def run(parser: OutputParser, pieces: list[str]) -> Delta:
    """Feed pieces, return everything merged (what a client would assemble)."""
    total = Delta()
    for d in [parser.feed(p) for p in pieces] + [parser.finish()]:
        total.content += d.content
        total.reasoning += d.reasoning
        total.tool_calls += d.tool_calls
    return total


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def test_json_tool_call_and_reasoning_whole() -> None:
    p = OutputParser(JSON_MARKERS, [], TOOLS)
    out = run(p, [OUTPUT])
    assert out.reasoning == "The user wants weather."
    assert out.content.strip() == "Let me check."
    assert len(out.tool_calls) == 1
    call = out.tool_calls[0]
    assert call["type"] == "function" and call["index"] == 0 and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert p.made_tool_call


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_token_split_gives_the_same_result(cuts: list[int]) -> None:
    out = run(OutputParser(JSON_MARKERS, [], TOOLS), split_at(OUTPUT, cuts))
    assert out.reasoning == "The user wants weather."
    assert out.content.strip() == "Let me check."
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_weather"]


def test_two_tool_calls_get_increasing_indexes() -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
    out = run(OutputParser(JSON_MARKERS, [], TOOLS), [call % "Paris", "\n", call % "Rome"])
    assert [c["index"] for c in out.tool_calls] == [0, 1]
    assert [json.loads(c["function"]["arguments"])["city"] for c in out.tool_calls] == [
        "Paris",
        "Rome",
    ]
    assert len({c["id"] for c in out.tool_calls}) == 2


def test_qwen3_coder_xml_parser() -> None:
    markers = Markers(
        tool_start=qwen3_coder.tool_call_start,
        tool_end=qwen3_coder.tool_call_end,
        tool_parser=qwen3_coder.parse_tool_call,
    )
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    out = run(OutputParser(markers, [], TOOLS), split_at(text, [5, 17, 40, 77]))
    assert out.tool_calls[0]["function"]["name"] == "get_weather"
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert out.content.strip() == ""


def test_without_tools_markers_are_plain_text() -> None:
    out = run(OutputParser(JSON_MARKERS, [], None), [OUTPUT])
    assert out.tool_calls == []
    assert "<tool_call>" in out.content and "get_weather" in out.content


def test_unparseable_tool_call_is_returned_as_text() -> None:
    p = OutputParser(JSON_MARKERS, [], TOOLS)
    out = run(p, ["<tool_call>{not json</tool_call> after"])
    assert out.tool_calls == []
    assert "{not json" in out.content and out.content.endswith(" after")
    assert not p.made_tool_call


def test_truncated_tool_call_is_not_lost() -> None:
    out = run(OutputParser(JSON_MARKERS, [], TOOLS), ['<tool_call>{"name": "get_wea'])
    assert out.tool_calls == [] and "get_wea" in out.content


def test_reasoning_from_prompt_opened_think() -> None:
    m = Markers(think_start="<think>", think_end="</think>", initial_state="reasoning")
    out = run(OutputParser(m, [], None), ["step one, ", "step two</think>", "Answer: 4"])
    assert out.reasoning == "step one, step two"
    assert out.content == "Answer: 4"


def test_stop_string_across_pieces_is_cut_and_stops() -> None:
    p = OutputParser(Markers(), ["END"], None)
    emitted = [p.feed(x).content for x in ["hello E", "N", "D world"]]
    assert "".join(emitted) == "hello "
    assert p.stopped
    assert p.feed("more").content == ""


@given(st.text(alphabet="abXY", max_size=30), st.lists(st.integers(0, 40), max_size=6))
def test_stop_filter_matches_str_find(text: str, cuts: list[int]) -> None:
    f = StopFilter(["XY", "bb"])
    out = "".join(f.feed(piece) for piece in split_at(text, cuts)) + f.flush()
    hits = [i for i in (text.find("XY"), text.find("bb")) if i >= 0]
    assert out == (text[: min(hits)] if hits else text)
    assert f.stopped == bool(hits)


def test_markers_from_a_tokenizer_wrapper_shape() -> None:
    class Tok:
        has_thinking = True
        think_start, think_end = "<think>", "</think>"
        think_start_tokens = (5,)
        has_tool_calling = True
        tool_call_start, tool_call_end = "<tool_call>", "</tool_call>"
        tool_parser = staticmethod(json_tools.parse_tool_call)

        def rfind_think_start(self, tokens):
            return max((i for i, t in enumerate(tokens) if t == 5), default=-1)

        def rfind_think_end(self, tokens):
            return max((i for i, t in enumerate(tokens) if t == 6), default=-1)

    assert Markers.from_tokenizer(Tok(), [1, 5, 2]).initial_state == "reasoning"
    assert Markers.from_tokenizer(Tok(), [1, 5, 6, 2]).initial_state == "normal"
    assert Markers.from_tokenizer(Tok(), [1, 5, 2]).tool_parser is not None
