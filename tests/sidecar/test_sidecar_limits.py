"""Context and KV-budget limits, checked before any work (no model needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.config import load_settings
from services.errors import APIError
from services.sidecar.engine import Engine

PER_TOKEN = 1024  # bytes of KV per token in these tests


def engine(budget_mb: int = 0, context: int = 1000) -> Engine:
    e = Engine(load_settings(sidecar_kv_budget_mb=budget_mb))
    e.loaded = SimpleNamespace(context_length=context)
    e.backend = SimpleNamespace(bytes_per_token_actual=PER_TOKEN)
    return e


def test_default_max_tokens_fills_the_context() -> None:
    assert engine().plan_max_tokens(100, None) == 900  # not mlx_lm.server's 512


def test_requested_max_tokens_is_kept_when_it_fits() -> None:
    assert engine().plan_max_tokens(100, 900) == 900


@pytest.mark.parametrize("prompt,requested", [(100, 901), (1000, None), (1200, 5)])
def test_beyond_context_is_400_with_numbers(prompt: int, requested: int | None) -> None:
    with pytest.raises(APIError) as e:
        engine().plan_max_tokens(prompt, requested)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert "1000" in e.value.message and str(prompt) in e.value.message


def test_kv_budget_caps_the_default_and_rejects_beyond() -> None:
    e = engine(budget_mb=1)  # 1 MiB / 1 KiB per token = 1024 tokens, above the 1000 context
    assert e.plan_max_tokens(100, None) == 900
    e = engine(budget_mb=1, context=4096)
    assert e.plan_max_tokens(100, None) == 1024 - 100
    with pytest.raises(APIError) as err:
        e.plan_max_tokens(100, 2000)
    assert err.value.code == "context_length_exceeded"
    assert "SIDECAR_KV_BUDGET_MB" in err.value.message and "2100" in err.value.message
    with pytest.raises(APIError):
        e.plan_max_tokens(1024, None)


def test_kv_budget_counts_the_full_precision_positions() -> None:
    e = engine(budget_mb=1, context=4096)
    e.backend.fixed_bytes_actual = 100 * PER_TOKEN  # e.g. the sink and a key group not yet full
    assert e.plan_max_tokens(100, None) == 1024 - 100 - 100


def test_empty_prompt_is_400() -> None:
    with pytest.raises(APIError) as e:
        engine().plan_max_tokens(0, None)
    assert e.value.status == 400
