"""The attention patch: which modules, idempotent, reversible, falls through, refuses."""

from __future__ import annotations

import importlib
import sys
import textwrap

import mlx.core as mx
import pytest
from mlx_lm.models import base
from mlx_lm.models.cache import KVCache, make_prompt_cache

from services.turboquant import (
    TurboQuantConfig,
    TurboQuantKVCache,
    UnsupportedModelError,
    check_model_supported,
    ensure_patched,
    install_patch,
    is_installed,
    patched_modules,
    uninstall_patch,
)
from services.turboquant import patch as tq_patch
from tests.turboquant.tiny_models import tiny_gemma2, tiny_llama, tiny_qwen3_5

ORIGINAL = tq_patch._base_original()


@pytest.fixture(autouse=True)
def _restore_patch():
    # Leave the process patched, as the other test modules expect.
    yield
    install_patch()


def test_install_patches_model_modules_idempotently():
    from mlx_lm.models import llama  # noqa: F401

    first = install_patch()
    assert "mlx_lm.models.base" in first and "mlx_lm.models.llama" in first
    assert llama.scaled_dot_product_attention is not ORIGINAL
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    dispatcher = llama.scaled_dot_product_attention
    assert install_patch() == first  # nothing changes the second time
    assert llama.scaled_dot_product_attention is dispatcher
    assert patched_modules() == first and is_installed()


def test_uninstall_restores_everywhere():
    from mlx_lm.models import llama

    patched = install_patch()
    restored = uninstall_patch()
    assert set(restored) == set(patched)
    assert llama.scaled_dot_product_attention is ORIGINAL
    assert base.scaled_dot_product_attention is ORIGINAL
    assert not is_installed() and patched_modules() == []
    assert uninstall_patch() == []
    # Our cache refuses to run unpatched instead of crashing inside mlx-lm.
    with pytest.raises(RuntimeError, match="install_patch"):
        TurboQuantKVCache().update_and_fetch(mx.zeros((1, 1, 1, 64)), mx.zeros((1, 1, 1, 64)))


def test_modules_imported_later_are_patched():
    install_patch()
    name = "mlx_lm.models.starcoder2"
    sys.modules.pop(name, None)
    mod = importlib.import_module(name)
    assert mod.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert name in patched_modules()
    uninstall_patch()
    assert mod.scaled_dot_product_attention is ORIGINAL


def test_qwen3_5_attention_comes_from_qwen3_next():
    uninstall_patch()
    model = tiny_qwen3_5()
    patched = ensure_patched(model)
    assert "mlx_lm.models.qwen3_next" in patched
    check_model_supported(model)


def test_falls_through_for_other_caches():
    model = tiny_llama(layers=2)
    tokens = mx.array([[1, 5, 9, 3, 7, 2]])
    uninstall_patch()
    ref = model(tokens, cache=make_prompt_cache(model))
    install_patch()
    out = model(tokens, cache=make_prompt_cache(model))
    assert mx.array_equal(out, ref)  # bit for bit: the original function ran


def test_dispatches_for_our_cache(monkeypatch):
    model = tiny_llama(layers=2)
    install_patch()
    calls = []
    real = tq_patch.turboquant_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(tq_patch, "turboquant_attention", spy)
    cache = [TurboQuantKVCache(TurboQuantConfig(key_bits=8, value_bits=8)) for _ in range(2)]
    kv = [KVCache() for _ in range(2)]
    tokens = mx.array([[1, 5, 9, 3, 7, 2]])
    out = model(tokens, cache=cache)
    ref = model(tokens, cache=kv)
    assert calls == [(1, 4, 6, 64)] * 2
    # At 8 bits our cache's logits are close to the float cache's.
    assert float(mx.abs(out - ref).max()) < 0.05 * float(mx.abs(ref).max())
    step = model(mx.array([[4]]), cache=cache)
    assert step.shape == (1, 1, 256) and calls[-1] == (1, 4, 1, 64)


def test_refuses_models_that_bypass_the_shared_function():
    model = tiny_gemma2()
    bad = tq_patch._bypassing_classes(model)
    assert bad == ["mlx_lm.models.gemma2.Attention"]  # found by inspection, not the list
    with pytest.raises(UnsupportedModelError, match="gemma2"):
        check_model_supported(model)
    check_model_supported(tiny_llama(layers=1))


def test_detection_finds_a_hand_written_attention(tmp_path, monkeypatch):
    # A model module of a kind we have never seen: it updates a KV cache and then calls
    # mx.fast.scaled_dot_product_attention itself.
    src = textwrap.dedent(
        """
        import mlx.core as mx
        import mlx.nn as nn
        from .base import scaled_dot_product_attention

        class Attention(nn.Module):
            def __call__(self, x, cache=None):
                k, v = cache.update_and_fetch(x, x)
                return mx.fast.scaled_dot_product_attention(x, k, v, scale=1.0)

        class Good(nn.Module):
            def __call__(self, x, cache=None):
                k, v = cache.update_and_fetch(x, x)
                return scaled_dot_product_attention(x, k, v, cache=cache, scale=1.0, mask=None)

        class Model(nn.Module):
            def __init__(self, good):
                super().__init__()
                self.layers = [Good() if good else Attention()]
        """
    )
    path = tmp_path / "tqfake.py"
    path.write_text(src)
    name = "mlx_lm.models.tqfake"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    with pytest.raises(UnsupportedModelError, match="tqfake.Attention"):
        check_model_supported(mod.Model(good=False))
    check_model_supported(mod.Model(good=True))
