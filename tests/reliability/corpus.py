"""A corpus of malformed requests: each is refused with an OpenAI 4xx, never forwarded.

Each case is ``(id, path, raw body bytes, extra headers)``. Shared by the pytest check and
the fuzzing seeds.
"""

from __future__ import annotations

import json

M = "qwen3.5:35b-a3b-coding-nvfp4"
OK_MSG = [{"role": "user", "content": "hi"}]


def body(**fields: object) -> bytes:
    base: dict[str, object] = {"model": M, "messages": OK_MSG}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


_DROP = object()
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
DEEP = 20_000  # far past Python's recursion limit, under the test router's size limit

CASES: list[tuple[str, str, bytes, dict[str, str]]] = [
    # --- not JSON, or not an object
    ("empty", CHAT, b"", {}),
    ("whitespace", CHAT, b"  \n\t ", {}),
    ("null", CHAT, b"null", {}),
    ("array", CHAT, b"[]", {}),
    ("number", CHAT, b"123", {}),
    ("string", CHAT, b'"hello"', {}),
    ("truncated", CHAT, b'{"model": "x", "messages": [', {}),
    ("trailing-garbage", CHAT, body() + b"xyz", {}),
    ("single-quotes", CHAT, b"{'model': 'x'}", {}),
    ("invalid-utf8", CHAT, b'{"model": "\xff\xfe", "messages": []}', {}),
    (
        "invalid-utf8-in-content",
        CHAT,
        b'{"model":"' + M.encode() + b'","messages":[{"role":"user","content":"\xc3\x28"}]}',
        {},
    ),
    ("utf16", CHAT, body().decode().encode("utf-16"), {}),
    ("deep-array", CHAT, b'{"model":"x","messages":' + b"[" * DEEP + b"]" * DEEP + b"}", {}),
    (
        "deep-object-in-content",
        CHAT,
        b'{"model":"'
        + M.encode()
        + b'","messages":[{"role":"user","content":'
        + b'{"a":' * DEEP
        + b"1"
        + b"}" * DEEP
        + b"}]}",
        {},
    ),
    ("nan-temperature", CHAT, body()[:-1] + b',"temperature":NaN}', {}),
    ("infinity-top-p", CHAT, body()[:-1] + b',"top_p":Infinity}', {}),
    ("overflow-float", CHAT, body()[:-1] + b',"temperature":1e999}', {}),
    (
        "nan-in-tool-schema",
        CHAT,
        body()[:-1] + b',"tools":[{"type":"function","function":{"name":"f","x":-Infinity}}]}',
        {},
    ),
    ("5000-digit-int", CHAT, body()[:-1] + b',"seed":' + b"9" * 5000 + b"}", {}),
    # --- model
    ("model-missing", CHAT, body(model=_DROP), {}),
    ("model-null", CHAT, body(model=None), {}),
    ("model-int", CHAT, body(model=7), {}),
    ("model-list", CHAT, body(model=[M]), {}),
    # --- messages
    ("messages-missing", CHAT, body(messages=_DROP), {}),
    ("messages-string", CHAT, body(messages="hello"), {}),
    ("messages-object", CHAT, body(messages={"role": "user"}), {}),
    ("messages-empty", CHAT, body(messages=[]), {}),
    ("message-string", CHAT, body(messages=["hi"]), {}),
    ("message-null", CHAT, body(messages=[None]), {}),
    ("role-missing", CHAT, body(messages=[{"content": "hi"}]), {}),
    ("role-unknown", CHAT, body(messages=[{"role": "root", "content": "hi"}]), {}),
    ("role-int", CHAT, body(messages=[{"role": 1, "content": "hi"}]), {}),
    ("content-int", CHAT, body(messages=[{"role": "user", "content": 5}]), {}),
    ("content-object", CHAT, body(messages=[{"role": "user", "content": {"text": "hi"}}]), {}),
    ("content-part-string", CHAT, body(messages=[{"role": "user", "content": ["hi"]}]), {}),
    (
        "content-part-no-type",
        CHAT,
        body(messages=[{"role": "user", "content": [{"text": "x"}]}]),
        {},
    ),
    (
        "content-part-text-int",
        CHAT,
        body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        {},
    ),
    (
        "tool-calls-string",
        CHAT,
        body(messages=[{"role": "assistant", "content": None, "tool_calls": "x"}]),
        {},
    ),
    (
        "tool-calls-items-int",
        CHAT,
        body(messages=[{"role": "assistant", "content": None, "tool_calls": [1]}]),
        {},
    ),
    # --- numbers and switches
    ("stream-string", CHAT, body(stream="yes"), {}),
    ("stream-int", CHAT, body(stream=1), {}),
    ("max-tokens-negative", CHAT, body(max_tokens=-1), {}),
    ("max-tokens-zero", CHAT, body(max_tokens=0), {}),
    ("max-tokens-float", CHAT, body(max_tokens=1.5), {}),
    ("max-tokens-string", CHAT, body(max_tokens="10"), {}),
    ("max-tokens-bool", CHAT, body(max_tokens=True), {}),
    ("max-tokens-huge", CHAT, body(max_tokens=10**30), {}),
    ("max-tokens-huge-stream", CHAT, body(max_tokens=10**30, stream=True), {}),
    ("max-completion-tokens-negative", CHAT, body(max_completion_tokens=-5), {}),
    ("temperature-string", CHAT, body(temperature="hot"), {}),
    ("top-p-bool", CHAT, body(top_p=True), {}),
    ("stream-options-string", CHAT, body(stream=True, stream_options="usage"), {}),
    ("tools-string", CHAT, body(tools="all"), {}),
    ("tools-items-int", CHAT, body(tools=[1, 2]), {}),
    # --- legacy completions
    ("prompt-missing", COMPL, json.dumps({"model": M}).encode(), {}),
    ("prompt-int", COMPL, json.dumps({"model": M, "prompt": 5}).encode(), {}),
    ("prompt-object", COMPL, json.dumps({"model": M, "prompt": {"a": 1}}).encode(), {}),
    ("prompt-mixed", COMPL, json.dumps({"model": M, "prompt": ["a", {"b": 1}]}).encode(), {}),
    ("prompt-bool-tokens", COMPL, json.dumps({"model": M, "prompt": [[True]]}).encode(), {}),
    (
        "prompt-huge-max",
        COMPL,
        json.dumps({"model": M, "prompt": "x", "max_tokens": 10**30}).encode(),
        {},
    ),
]

# Well-typed at the level the router checks, wrong deeper down: the router forwards them and
# the backend answers 4xx (Ollama's and the sidecar's own validation); never a router 5xx.
_FORWARDED_IDS = ("utf16", "content-part-text-int", "tool-calls-items-int", "prompt-bool-tokens")
FORWARDED = [c for c in CASES if c[0] in _FORWARDED_IDS]
CASES = [c for c in CASES if c[0] not in _FORWARDED_IDS]
