"""The end-to-end decode bench's plumbing on any machine (its numbers come from the GPU)."""

from __future__ import annotations

import pytest

from bench import e2e_decode_gpu as e2e


@pytest.mark.parametrize("kind", ["fp16", "tq-default"])
def test_a_batch_decodes_and_its_host_time_is_split(kind):
    model = e2e.build("llama-3.1-8b", tiny=True)
    one = e2e.run_one(model, kind, context=300, steps=2, repeats=1, batch=1)
    two = e2e.run_one(model, kind, context=300, steps=2, repeats=1, batch=2)
    assert two["batch"] == 2 and two["tok_s"] > 0
    # every sequence of the batch holds its own keys and values
    assert 1.8 < two["kv_bytes"] / one["kv_bytes"] < 2.2
    assert set(two["host_ms"]) == {"build", "dispatch", "wait"}
    assert all(v >= 0 for v in two["host_ms"].values())
