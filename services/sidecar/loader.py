"""Load the one model the sidecar serves (called on the engine thread: it touches MLX)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

log = logging.getLogger("tqstack.sidecar")

# Keys model configs use for the trained context length, most specific first.
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx")
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class LoadedModel:
    """The model, its mlx-lm tokenizer wrapper and what we know about it."""

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    model_id: str
    path: str
    context_length: int
    dtype: str


def model_id_for(spec: str) -> str:
    """The id clients see: the embedded name, a directory's name, or the Hugging Face id."""
    if spec.startswith("embedded:"):
        return spec.split(":", 1)[1]
    p = Path(spec).expanduser()
    if p.is_dir():
        return p.resolve().name
    return spec


def resolve_spec(spec: str, models_dir: Path) -> str:
    """A local path (converting an embedded model on first use) or a Hugging Face id."""
    from services.models.embedded import resolve_model

    return str(resolve_model(spec, models_dir))


def context_length_of(config: dict[str, Any]) -> int | None:
    """The trained context length named in a model config (text_config included)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            v = cfg.get(key)
            if isinstance(v, int) and v > 0:
                return v
    return None


def load(settings: Any) -> LoadedModel:
    """Resolve ``settings.sidecar_model`` and load it with mlx-lm in the chosen dtype."""
    from mlx_lm.utils import load as mlx_load

    from services.models.embedded import runtime_dtype

    spec = settings.sidecar_model
    path = resolve_spec(spec, settings.resolved_models_dir)
    model, tokenizer, config = mlx_load(path, return_config=True)
    # One rule for every loader: float32 on Linux CPU, the manifest's GPU dtype for embedded models.
    name = runtime_dtype(settings.sidecar_dtype, path)
    dtype = _DTYPES[name] if name else None
    if dtype is not None:
        # Only floating parameters change; packed quantized weights stay as they are.
        model.set_dtype(dtype)
        mx.eval(model.parameters())
    ctx = settings.sidecar_max_context or context_length_of(config)
    if not ctx:
        ctx = 4096
        log.warning("model config names no context length; assuming %d", ctx)
    leaf = next(iter(v for _, v in _leaves(model.parameters())), None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        model_id=model_id_for(spec),
        path=path,
        context_length=int(ctx),
        dtype=str(leaf.dtype).replace("mlx.core.", "") if leaf is not None else "unknown",
    )


def _leaves(tree: Any):
    from mlx.utils import tree_flatten

    return [
        (k, v) for k, v in tree_flatten(tree) if v.dtype in (mx.float32, mx.float16, mx.bfloat16)
    ]
