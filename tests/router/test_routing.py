"""The pure routing decision: prefixes, the token estimate, thresholds and context fit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.router import routing
from services.router.routing import BackendView, RoutingError, decide, parse_model

UP = BackendView(True, None)


def views(ollama: BackendView = UP, sidecar: BackendView = UP) -> dict:
    return {"ollama": ollama, "sidecar": sidecar}


@pytest.mark.parametrize(
    ("model", "forced", "name"),
    [
        ("tq:auto", "sidecar", "auto"),
        ("turbo:x", "sidecar", "x"),
        (
            "sidecar:mlx-community/Qwen3.5-35B-A3B-4bit",
            "sidecar",
            "mlx-community/Qwen3.5-35B-A3B-4bit",
        ),
        ("TQ:auto", "sidecar", "auto"),
        ("ollama:qwen3.5:35b-a3b-coding-nvfp4", "ollama", "qwen3.5:35b-a3b-coding-nvfp4"),
        ("local:llama3.2:1b", "ollama", "llama3.2:1b"),
        ("qwen3.5:35b-a3b-coding-nvfp4", None, "qwen3.5:35b-a3b-coding-nvfp4"),
        ("tqwen:7b", None, "tqwen:7b"),  # a tag that merely starts with "tq"
    ],
)
def test_parse_model_prefixes(model: str, forced: str | None, name: str) -> None:
    t = parse_model(model)
    assert (t.forced, t.name) == (forced, name)


def test_estimate_counts_chars_and_template_overhead() -> None:
    msgs = [{"role": "user", "content": "x" * 400}]
    assert routing.estimate_chat_tokens(msgs) == (400 + 40) // 4
    two = msgs + [{"role": "assistant", "content": "y" * 400}]
    assert routing.estimate_chat_tokens(two) == (800 + 80) // 4


def test_estimate_counts_multipart_tools_and_tool_calls() -> None:
    text_only = [{"role": "user", "content": "a" * 100}]
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "a" * 100}, {"type": "text", "text": "b" * 100}],
        }
    ]
    assert routing.estimate_chat_tokens(parts) > routing.estimate_chat_tokens(text_only)
    image = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ]
    assert routing.estimate_chat_tokens(image) >= routing.IMAGE_TOKENS
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "d" * 400,
                "parameters": {"type": "object"},
            },
        }
    ]
    assert (
        routing.estimate_chat_tokens(text_only, tools)
        >= routing.estimate_chat_tokens(text_only) + 100
    )
    call = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "z" * 400}}
            ],
        }
    ]
    assert routing.estimate_chat_tokens(call) >= 100


def test_estimate_completion_prompts() -> None:
    assert routing.estimate_completion_tokens("x" * 40) == 10
    assert routing.estimate_completion_tokens([1, 2, 3]) == 3
    assert routing.estimate_completion_tokens(["x" * 40, "x" * 80]) == 20


@given(st.lists(st.text(max_size=300), min_size=1, max_size=8), st.text(max_size=300))
def test_estimate_grows_with_content(contents: list[str], extra: str) -> None:
    msgs = [{"role": "user", "content": c} for c in contents]
    more = msgs + [{"role": "user", "content": extra}]
    assert routing.estimate_chat_tokens(more) > routing.estimate_chat_tokens(msgs)


def test_threshold_auto_follows_sidecar_architecture() -> None:
    assert routing.threshold_for("auto", "pure_sdpa") == (6000, "sidecar:pure_sdpa")
    assert routing.threshold_for("auto", "hybrid") == (16000, "sidecar:hybrid")
    assert routing.threshold_for("auto", None) == (6000, "default")
    assert routing.threshold_for(1234, "hybrid") == (1234, "config")


def test_auto_routing_by_length_at_threshold() -> None:
    assert decide("m", 5999, None, 6000, views()).backend == "ollama"
    d = decide("m", 6000, None, 6000, views())
    assert (d.backend, d.reason, d.alternate) == ("sidecar", "auto-long", "ollama")
    assert decide("m", 10, None, 6000, views()).reason == "auto-short"


def test_prefix_beats_length() -> None:
    d = decide("ollama:m", 9000, None, 6000, views())
    assert (d.backend, d.reason, d.target.name) == ("ollama", "prefix", "m")
    d = decide("tq:auto", 1, None, 6000, views())
    assert (d.backend, d.reason) == ("sidecar", "prefix")


def test_down_backend_falls_back_both_ways() -> None:
    down = BackendView(False, None)
    d = decide("m", 10, None, 6000, views(ollama=down))
    assert (d.backend, d.reason, d.alternate) == ("sidecar", "fallback", "ollama")
    d = decide("tq:auto", 10, None, 6000, views(sidecar=down))
    assert (d.backend, d.reason) == ("ollama", "fallback")


def test_both_down_still_tries_the_choice() -> None:
    down = BackendView(False, None)
    d = decide("m", 10, None, 6000, views(down, down))
    assert d.backend == "ollama"  # the proxy reports the connection failure


def test_context_fit_moves_prompt_where_it_fits() -> None:
    small = BackendView(True, 4096)
    d = decide("m", 3000, 2000, 6000, views(ollama=small, sidecar=BackendView(True, 32768)))
    assert (d.backend, d.reason, d.needed_tokens, d.alternate) == ("sidecar", "context", 5000, None)
    # even a prefix cannot send a prompt where it would be cut
    d = decide("ollama:m", 5000, None, 6000, views(ollama=small))
    assert (d.backend, d.reason) == ("sidecar", "context")
    # the long prompt does not fit the sidecar but fits Ollama's larger window
    d = decide("m", 7000, None, 6000, views(BackendView(True, 131072), BackendView(True, 4096)))
    assert (d.backend, d.reason) == ("ollama", "context")


def test_context_fits_nowhere_is_400() -> None:
    with pytest.raises(RoutingError) as e:
        decide("m", 9000, 1000, 6000, views(BackendView(True, 4096), BackendView(True, 8192)))
    assert (e.value.status, e.value.code) == (400, "context_length_exceeded")
    assert "10000" in e.value.message


def test_fits_only_on_a_down_backend_is_503() -> None:
    with pytest.raises(RoutingError) as e:
        decide("m", 5000, None, 6000, views(BackendView(True, 4096), BackendView(False, 32768)))
    assert e.value.status == 503


def test_no_alternate_when_it_would_not_fit() -> None:
    d = decide("m", 7000, None, 6000, views(BackendView(True, 4096), BackendView(True, 32768)))
    assert (d.backend, d.alternate) == ("sidecar", None)


def test_upstream_model_names() -> None:
    kw = {"ollama_default": "qwen:default", "sidecar_model": "mlx/Model"}
    t = routing.ModelTarget
    assert routing.upstream_model("sidecar", t("sidecar", "auto"), **kw) == "mlx/Model"
    assert routing.upstream_model("sidecar", t(None, "llama3.2:1b"), **kw) == "mlx/Model"
    assert routing.upstream_model("ollama", t(None, "llama3.2:1b"), **kw) == "llama3.2:1b"
    assert routing.upstream_model("ollama", t("sidecar", "auto"), **kw) == "qwen:default"
    assert routing.upstream_model("ollama", t(None, "auto"), **kw) == "qwen:default"
    assert routing.upstream_model("ollama", t("ollama", ""), **kw) == "qwen:default"
    assert (
        routing.upstream_model("sidecar", t("sidecar", "x"), ollama_default="d", sidecar_model=None)
        == "x"
    )
