"""Tool calls end to end: the real sidecar, SmolLM2 told (via tokenizer_config) to use
mlx-lm's ``json_tools`` parser, and a few-shot prompt that makes it emit a tool call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_process
from tests.sidecar.harness import Sidecar, start_sidecar

pytestmark = [pytest.mark.model, pytest.mark.slow]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def call(city: str) -> str:
    body = json.dumps({"name": "get_weather", "arguments": {"city": city}})
    return f"<tool_call>\n{body}\n</tool_call>"


MESSAGES = [
    {"role": "system", "content": "You answer weather questions with a tool call only."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": call("Paris")},
    {"role": "user", "content": "Weather in Berlin?"},
    {"role": "assistant", "content": call("Berlin")},
    {"role": "user", "content": "Weather in Rome?"},
]


@pytest.fixture(scope="module")
def tool_sidecar(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("tools")
    model = tmp / "smollm2-json-tools"
    model.mkdir()
    for f in smollm2_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (model / f.name).symlink_to(f)
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    cfg["tool_parser_type"] = "json_tools"  # mlx-lm reads this to pick the parser
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    sc = start_sidecar(model, tmp)
    try:
        yield sc
    finally:
        stop_process(sc.proc)


def test_tool_call_non_stream(tool_sidecar: Sidecar) -> None:
    r = tool_sidecar.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=40
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.id
    assert tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Rome"}
    assert not (choice.message.content or "").strip()


def test_tool_call_streamed_as_delta(tool_sidecar: Sidecar) -> None:
    chunks = list(
        tool_sidecar.client().chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=40, stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1
    d = deltas[0]
    assert d.index == 0 and d.id and d.type == "function"
    assert d.function.name == "get_weather"
    assert json.loads(d.function.arguments) == {"city": "Rome"}
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["tool_calls"]


def test_without_tools_the_markup_is_plain_content(tool_sidecar: Sidecar) -> None:
    r = tool_sidecar.client().chat.completions.create(
        model="m", messages=MESSAGES, temperature=0, max_tokens=40
    )
    assert r.choices[0].message.tool_calls is None
    assert "<tool_call>" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
