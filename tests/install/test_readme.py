"""The README keeps its two commands, and its KV memory table is what our code computes."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_two_commands_section():
    section = README.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    assert "bash install.sh" in section and "bash scripts/test.sh" in section
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_every_documented_script_exists():
    for name in set(re.findall(r"scripts/([a-z-]+\.sh)", README)):
        assert (REPO / "scripts" / name).exists(), name


@pytest.mark.model
def test_kv_table_matches_hybrid_cache(smollm2_dir):
    from services.config import load_settings
    from services.hybrid_cache import describe_model, kv_memory_markdown, model_skeleton
    from services.turboquant import TurboQuantConfig

    config = TurboQuantConfig.from_settings(load_settings(config_path="/nonexistent"))
    report = describe_model(model_skeleton(smollm2_dir), config)
    table = kv_memory_markdown(report, [2048, 8192])
    rows = [line for line in table.splitlines() if re.match(r"\| [\d,]+ \|", line)]
    assert len(rows) == 2
    for row in rows:
        assert row in README, f"README's SmolLM2 table is stale: {row}"
    assert (
        f"{report.kv_bytes_per_token_fp16:,} → {report.kv_bytes_per_token_compressed:,}" in README
    )


@pytest.mark.model
def test_library_example_runs(smollm2_dir):
    """The README's Python example, on the embedded model: the cache really fills."""
    section = README.split("## The TurboQuant cache from Python", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'load("models/smollm2-135m-instruct")' in code
    code = code.replace('"models/smollm2-135m-instruct"', repr(str(smollm2_dir)))
    printed: list[str] = []
    scope = {"print": lambda *a: printed.append(" ".join(map(str, a)))}
    exec(compile(code, "README.md", "exec"), scope)
    assert printed and printed[0].strip()
    tq = [c for c in scope["cache"] if type(c).__name__ == "TurboQuantKVCache"]
    assert len(tq) == 30 and all(c.offset > 10 for c in tq)
    assert tq[0].key_quantizer == "channel" and tq[0].sink_tokens == 1
