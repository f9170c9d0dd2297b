"""Route mlx-lm's attention through TurboQuant when a layer's cache is ours.

mlx-lm models import ``scaled_dot_product_attention`` from ``mlx_lm.models.base`` by name
at import time, so patching ``base`` alone changes nothing for a loaded model: we rebind
the name in every loaded ``mlx_lm.models.*`` module that holds the original (under any
attribute name). ``base`` itself is patched too, so modules imported later bind ours.
The replacement dispatches only for :class:`TurboQuantKVCache` and falls through to the
original for every other cache.
"""

from __future__ import annotations

import inspect
import re
import sys
import threading
from typing import Any

from . import rope_fusion
from .attention import turboquant_attention
from .cache import TurboQuantKVCache
from .rope_fusion import defer_rope, kernel_takes_rope, restore_rope

_PREFIX = "mlx_lm.models."
_lock = threading.Lock()
_original: Any = None

# Architectures known to compute attention by hand (detection below should catch them;
# the list is a safety net for when source code cannot be read).
KNOWN_BYPASS = frozenset({"gemma2", "olmo", "plamo2", "deepseek_v41"})


class UnsupportedModelError(RuntimeError):
    """The model's attention does not call mlx-lm's shared ``scaled_dot_product_attention``."""


def _base_original() -> Any:
    global _original
    if _original is None:
        from mlx_lm.models import base

        fn = base.scaled_dot_product_attention
        _original = getattr(fn, "__wrapped_original__", fn)
    return _original


def _make_dispatcher(original: Any) -> Any:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, TurboQuantKVCache):
            return turboquant_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.__wrapped_original__ = original
    scaled_dot_product_attention.__doc__ = (
        "mlx-lm's scaled_dot_product_attention, routed to TurboQuant for its cache."
    )
    return scaled_dot_product_attention


_dispatcher: Any = None


def _get_dispatcher() -> Any:
    global _dispatcher
    if _dispatcher is None:
        _dispatcher = _make_dispatcher(_base_original())
    return _dispatcher


def _model_modules() -> list[tuple[str, Any]]:
    return [
        (n, m) for n, m in list(sys.modules.items()) if m is not None and (n.startswith(_PREFIX))
    ]


def _patch_module(module: Any) -> bool:
    original, ours = _base_original(), _get_dispatcher()
    hit = False
    for attr, value in list(vars(module).items()):
        if value is original:
            setattr(module, attr, ours)
            hit = True
        elif value is ours:
            hit = True
    return hit


def install_patch() -> list[str]:
    """Patch every loaded ``mlx_lm.models.*`` module; return all modules now patched.

    Idempotent (a second call changes nothing and returns the same list).
    """
    with _lock:
        import mlx_lm.models.base  # noqa: F401  (make sure the original exists)

        return sorted(name for name, mod in _model_modules() if _patch_module(mod))


def uninstall_patch() -> list[str]:
    """Restore the original function everywhere; return the modules restored."""
    with _lock:
        if _dispatcher is None:
            return []
        restored = []
        for name, mod in _model_modules():
            for attr, value in list(vars(mod).items()):
                if value is _dispatcher:
                    setattr(mod, attr, _original)
                    restored.append(name)
        return sorted(set(restored))


def is_installed() -> bool:
    """True while ``mlx_lm.models.base`` carries our dispatcher."""
    base = sys.modules.get(_PREFIX + "base")
    return (
        base is not None
        and _dispatcher is not None
        and (base.scaled_dot_product_attention is _dispatcher)
    )


def patched_modules() -> list[str]:
    """Modules whose binding is currently our dispatcher."""
    if _dispatcher is None:
        return []
    return sorted(n for n, m in _model_modules() if any(v is _dispatcher for v in vars(m).values()))


def _modules_of(model: Any) -> set[str]:
    names = {type(model).__module__}
    modules = getattr(model, "modules", None)
    if callable(modules):
        names |= {type(m).__module__ for m in modules()}
    return {n for n in names if n.startswith(_PREFIX)}


def ensure_patched(model: Any) -> list[str]:
    """Install the patch, including the modules ``model``'s classes come from; where the
    layer kernel applies RoPE itself (CUDA), leave it the decode steps' (rope_fusion)."""
    for name in _modules_of(model):
        __import__(name)
    if kernel_takes_rope() and rope_fusion.ENABLED:
        defer_rope(model)
    elif not rope_fusion.ENABLED:
        restore_rope(model)
    return install_patch()


_SDPA_CALL = re.compile(r"(?<![\w.])(\w+)\s*\(")


def _bypassing_classes(model: Any) -> list[str]:
    """Classes that update a KV cache but do not call the shared SDPA by a patched name."""
    original = _base_original()
    seen: set[type] = set()
    bad = []
    for m in [model, *model.modules()] if callable(getattr(model, "modules", None)) else [model]:
        cls = type(m)
        if cls in seen or not cls.__module__.startswith(_PREFIX):
            continue
        seen.add(cls)
        call = cls.__dict__.get("__call__")
        if call is None:
            continue
        try:
            src = inspect.getsource(call)
        except (OSError, TypeError):
            continue
        if "update_and_fetch" not in src:
            continue
        module = sys.modules.get(cls.__module__)
        names = {
            a
            for a, v in vars(module).items()
            if v is original or getattr(v, "__wrapped_original__", None) is original
        }
        called = set(_SDPA_CALL.findall(src))
        if not names & called:
            bad.append(f"{cls.__module__}.{cls.__qualname__}")
    return bad


def check_model_supported(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` if TurboQuant would be bypassed by ``model``.

    Detection: every class of the model whose ``__call__`` updates a KV cache must call
    mlx-lm's shared ``scaled_dot_product_attention`` (the function we patch).
    """
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    module = type(model).__module__.rsplit(".", 1)[-1]
    bad = _bypassing_classes(model)
    if module in KNOWN_BYPASS or model_type in KNOWN_BYPASS:
        bad = bad or [module]
    if bad:
        raise UnsupportedModelError(
            f"model type {model_type or module!r} computes attention without mlx-lm's shared "
            f"scaled_dot_product_attention ({', '.join(bad)}); the TurboQuant cache would "
            "not be used. Run it with a plain KVCache (TQ_ENABLED=0) instead."
        )
