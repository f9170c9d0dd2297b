"""Which layers get the TurboQuant cache, and what the KV cache costs per token.

mlx-lm's ``make_prompt_cache(model)`` is the one uniform signal of a layer's attention
type: a plain ``KVCache`` is full softmax attention (we compress it); ``ArraysCache`` is
recurrent state (Gated DeltaNet / SSM), ``RotatingKVCache`` a sliding window, anything else
something we do not understand: all of those stay exactly as the model made them.

Public calls:

- :func:`make_turboquant_cache` -- the per-layer cache list (counterpart of
  ``mlx_lm.models.cache.make_prompt_cache``) for ``generate``/``stream_generate``.
- :func:`describe_model` -- architecture kind, compressed layers and KV bytes per token,
  computed from the model's own attention modules (KV heads and head dims per layer).
- :func:`kv_memory_table` / :func:`kv_memory_markdown` -- KV memory at given contexts.
- :func:`cache_memory` -- fp16-equivalent and actual bytes held by a live cache list.

``python -m services.hybrid_cache --model DIR --contexts 8192,32768`` prints the report and
the memory table for a model directory (only ``config.json`` is read: no weights loaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)

FP16_BYTES = 2
# Scales/biases/norms of our compressed cache are stored in float16 whatever the model dtype.
SIDE_BYTES = 2

Role = Literal["compressed", "boundary", "full", "sliding", "state", "other"]


# --------------------------------------------------------------------------- layer selection


def _is_plain_kv(cache: Any) -> bool:
    # Exact type: subclasses (batched, chunked) have semantics our cache does not reproduce.
    return type(cache) is KVCache


def softmax_layer_indices(cache_list: Sequence[Any]) -> list[int]:
    """Indices of the full softmax-attention layers (plain ``KVCache`` entries)."""
    return [i for i, c in enumerate(cache_list) if _is_plain_kv(c)]


def boundary_layer_indices(softmax_layers: Sequence[int], n: int) -> list[int]:
    """The first and last ``n`` softmax layers (the ones kept at higher precision)."""
    if n <= 0:
        return []
    chosen = set(softmax_layers[:n]) | set(softmax_layers[-n:])
    return sorted(chosen)


def replace_kv_caches(
    model: nn.Module,
    factory: Callable[[int, bool], Any],
    *,
    boundary_layers: int = 0,
) -> list[Any]:
    """``make_prompt_cache(model)`` with each plain ``KVCache`` replaced by ``factory(i, b)``.

    ``i`` is the layer index, ``b`` whether it is a boundary layer. ``factory`` may return
    the ``KVCache`` unchanged (``None`` means: keep it). Every other entry is kept as is.
    """
    caches = make_prompt_cache(model)
    softmax = softmax_layer_indices(caches)
    boundary = set(boundary_layer_indices(softmax, boundary_layers))
    for i in softmax:
        new = factory(i, i in boundary)
        if new is not None:
            caches[i] = new
    return caches


def _turboquant() -> tuple[Any, Any, Any]:
    # Imported on use (the cache class, the patch); hybrid_cache itself needs neither.
    from services.turboquant.cache import TurboQuantKVCache
    from services.turboquant.patch import check_model_supported, ensure_patched

    return TurboQuantKVCache, ensure_patched, check_model_supported


def layer_config(config: Any, boundary: bool) -> Any | None:
    """The cache config for one softmax layer; ``None``: keep a full-precision ``KVCache``."""
    if not boundary:
        return config
    bits = int(config.boundary_bits)
    if bits >= 16:
        return None
    return dataclasses.replace(config, key_bits=bits, value_bits=bits)


def make_turboquant_cache(model: nn.Module, config: Any) -> list[Any]:
    """Per-layer prompt cache for ``model`` with TurboQuant on its full-attention layers.

    The counterpart of mlx-lm's ``make_prompt_cache``: pass the result as
    ``prompt_cache=`` to ``mlx_lm.generate``/``stream_generate``. Installs the attention
    patch (idempotent) and refuses models whose attention bypasses the shared function.
    Boundary layers (first/last ``config.boundary_layers`` softmax layers) use
    ``config.boundary_bits`` for keys and values (16 or more: an unquantized ``KVCache``).
    """
    cache_cls, ensure_patched, check_model_supported = _turboquant()
    # ensure_patched imports the model's own modules first, so their bindings get patched.
    ensure_patched(model)
    check_model_supported(model)

    def factory(_i: int, boundary: bool) -> Any:
        cfg = layer_config(config, boundary)
        return None if cfg is None else cache_cls(cfg)

    return replace_kv_caches(model, factory, boundary_layers=int(config.boundary_layers))


# --------------------------------------------------------------------------- sizes


def _packed_bytes(dim: int, bits: int) -> int:
    # Codes are packed into uint32 words, as mx.quantize does.
    return math.ceil(dim * bits / 32) * 4


def side_nbytes(spec: Any, dim: int) -> int:
    """Bytes our cache stores for one ``dim``-vector of a side (keys or values).

    ``spec`` is a ``SideSpec`` (``config.key_spec()``/``value_spec()``). affine: packed
    codes + a float16 scale and bias per group; codebook: packed codes + one float16 norm;
    channel: codes + a float16 scale and bias per channel and group of positions (a share).
    Normalization (norm baking) folds into those numbers and costs no byte.
    """
    if spec.bits >= 16:
        return dim * FP16_BYTES
    if spec.quantizer == "channel":  # per channel: a scale and bias per group of positions
        return dim * spec.bits / 8 + 2 * SIDE_BYTES * dim / int(spec.group_size)
    packed = _packed_bytes(dim, spec.bits)
    if spec.quantizer == "codebook":
        return packed + SIDE_BYTES
    return packed + 2 * SIDE_BYTES * math.ceil(dim / min(int(spec.group_size), dim))


@dataclass(frozen=True)
class LayerKV:
    """One layer's KV cache as the report sees it."""

    index: int
    cache: str  # class name of the entry make_prompt_cache made
    role: Role
    n_kv_heads: int = 0
    k_head_dim: int = 0
    v_head_dim: int = 0
    key_bits: int = 16
    value_bits: int = 16
    window: int | None = None  # sliding layers: tokens kept

    @property
    def fp16_bytes_per_token(self) -> int:
        return self.n_kv_heads * (self.k_head_dim + self.v_head_dim) * FP16_BYTES


@dataclass
class ModelKVReport:
    """KV cache layout of one model under one cache config."""

    model_type: str
    kind: Literal["pure_sdpa", "hybrid"]
    num_layers: int
    compressed_layers: list[int]
    sliding_layers: list[int]
    state_layers: list[int]
    boundary_layers: list[int]
    kv_bytes_per_token_fp16: int  # full-attention layers, float16 keys and values
    kv_bytes_per_token_compressed: int  # the same layers with our cache
    sliding_bytes_per_token_fp16: int = 0  # sliding layers (bounded by their windows)
    layers: list[LayerKV] = field(default_factory=list)
    # Compressed layers keep this many positions in full precision at most (attention
    # sinks, the recent window and one block not yet quantized): a fixed cost per sequence.
    full_precision_positions: int = 0
    full_precision_extra_bytes: int = 0  # what each such position costs above compressed

    def compressed_bytes_at(self, context: int) -> int:
        """Compressed-layer bytes of one sequence at ``context`` (fixed part included)."""
        fixed = min(context, self.full_precision_positions)
        return (
            self.kv_bytes_per_token_compressed * context + self.full_precision_extra_bytes * fixed
        )

    def bits_per_element_at(self, context: int) -> float:
        """Effective bits per element at ``context``, the full-precision positions included."""
        elems = self.kv_bytes_per_token_fp16 / FP16_BYTES * context
        return 8 * self.compressed_bytes_at(context) / elems if elems else 16.0

    @property
    def compression(self) -> float:
        """fp16 / compressed bytes over the compressed layers."""
        if not self.kv_bytes_per_token_compressed:
            return 1.0
        return self.kv_bytes_per_token_fp16 / self.kv_bytes_per_token_compressed

    @property
    def bits_per_element(self) -> float:
        """Effective bits per stored K/V element (side data included)."""
        elems = self.kv_bytes_per_token_fp16 / FP16_BYTES
        return 8 * self.kv_bytes_per_token_compressed / elems if elems else 16.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compression"] = round(self.compression, 3)
        d["bits_per_element"] = round(self.bits_per_element, 3)
        return d


def _model_args(model: nn.Module) -> Any:
    inner = getattr(model, "language_model", None)
    return getattr(inner, "args", None) or getattr(model, "args", None)


def _attention_module(layer: nn.Module) -> nn.Module | None:
    for name in ("self_attn", "attention", "attn", "mixer"):
        mod = getattr(layer, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def _first_attr(objs: Sequence[Any], names: Sequence[str]) -> int | None:
    for obj in objs:
        if obj is None:
            continue
        for name in names:
            v = getattr(obj, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def layer_kv_shape(model: nn.Module, index: int) -> tuple[int, int, int]:
    """``(n_kv_heads, k_head_dim, v_head_dim)`` of layer ``index`` from its attention module.

    Falls back to the model args (``num_key_value_heads``, ``head_dim``) and finally to the
    ``k_proj``/``v_proj`` output widths.
    """
    args = _model_args(model)
    attn = _attention_module(model.layers[index])
    n_kv = _first_attr([attn, args], ("n_kv_heads", "num_key_value_heads", "num_kv_heads"))
    if n_kv is None and args is not None:
        n_kv = _first_attr([args], ("num_attention_heads",))
    head = _first_attr([attn, args], ("head_dim", "k_head_dim"))
    k_proj = getattr(attn, "k_proj", None)
    v_proj = getattr(attn, "v_proj", None)
    if head is None and args is not None:
        hidden, heads = (
            getattr(args, "hidden_size", None),
            getattr(args, "num_attention_heads", None),
        )
        head = hidden // heads if hidden and heads else None
    if n_kv is None or head is None:
        raise ValueError(f"cannot tell the KV heads/head_dim of layer {index}")
    k_dim = head
    v_dim = _first_attr([attn], ("v_head_dim",)) or head
    # Projection widths are the ground truth where present (quantized weights excepted).
    for proj, is_k in ((k_proj, True), (v_proj, False)):
        w = getattr(proj, "weight", None)
        if w is not None and getattr(proj, "bits", None) is None and w.shape[0] % n_kv == 0:
            width = w.shape[0] // n_kv
            if is_k:
                k_dim = width
            else:
                v_dim = width
    return n_kv, k_dim, v_dim


def describe_model(model: nn.Module, config: Any) -> ModelKVReport:
    """Architecture kind, layer roles and KV bytes per token for ``model`` under ``config``.

    ``kind`` is ``hybrid`` when some layers keep recurrent state instead of a KV cache
    (Gated DeltaNet, SSM), else ``pure_sdpa`` (sliding-window layers are still SDPA).
    Byte counts use each layer's own KV heads and head dims, the configured bits (boundary
    layers at ``boundary_bits``), group size and norms.
    """
    caches = make_prompt_cache(model)
    softmax = softmax_layer_indices(caches)
    boundary = boundary_layer_indices(softmax, int(getattr(config, "boundary_layers", 0)))
    layers: list[LayerKV] = []
    fp16 = comp = sliding = 0
    fixed_bytes = 0
    fixed = int(config.sink_tokens) + int(config.window)
    fixed += int(config.group_size) - 1 if config.key_spec().per_channel else 0
    for i, c in enumerate(caches):
        name = type(c).__name__
        if _is_plain_kv(c):
            n_kv, kd, vd = layer_kv_shape(model, i)
            cfg = layer_config(config, i in boundary)
            kb = 16 if cfg is None else int(cfg.key_bits)
            vb = 16 if cfg is None else int(cfg.value_bits)
            role: Role = "full" if cfg is None else ("boundary" if i in boundary else "compressed")
            lk = LayerKV(i, name, role, n_kv, kd, vd, kb, vb)
            fp16 += lk.fp16_bytes_per_token
            if cfg is None:
                comp += lk.fp16_bytes_per_token
            else:
                packed = n_kv * (
                    side_nbytes(cfg.key_spec(), kd) + side_nbytes(cfg.value_spec(), vd)
                )
                comp += packed
                fixed_bytes += lk.fp16_bytes_per_token - packed
        elif isinstance(c, RotatingKVCache):
            n_kv, kd, vd = layer_kv_shape(model, i)
            lk = LayerKV(i, name, "sliding", n_kv, kd, vd, window=int(c.max_size))
            sliding += lk.fp16_bytes_per_token
        elif isinstance(c, ArraysCache):
            lk = LayerKV(i, name, "state")
        else:
            lk = LayerKV(i, name, "other")
        layers.append(lk)
    state = [lk.index for lk in layers if lk.role in ("state", "other")]
    return ModelKVReport(
        model_type=str(
            getattr(model, "model_type", "") or getattr(_model_args(model), "model_type", "")
        ),
        kind="hybrid" if state else "pure_sdpa",
        num_layers=len(caches),
        compressed_layers=[lk.index for lk in layers if lk.role in ("compressed", "boundary")],
        sliding_layers=[lk.index for lk in layers if lk.role == "sliding"],
        state_layers=state,
        boundary_layers=boundary,
        kv_bytes_per_token_fp16=fp16,
        kv_bytes_per_token_compressed=round(comp),
        sliding_bytes_per_token_fp16=sliding,
        layers=layers,
        full_precision_positions=fixed if fixed_bytes else 0,
        full_precision_extra_bytes=round(fixed_bytes),
    )


@dataclass(frozen=True)
class KVMemoryRow:
    """KV memory at one context length (bytes)."""

    context: int
    fp16_bytes: int
    compressed_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.fp16_bytes - self.compressed_bytes


def kv_memory_table(report: ModelKVReport, contexts: Sequence[int]) -> list[KVMemoryRow]:
    """KV cache bytes at each context, fp16 vs TurboQuant (one sequence).

    Full-attention layers grow with the context; sliding layers hold at most their window
    (uncompressed in both columns). Recurrent state (GDN/SSM) is not KV and is not counted.
    """
    rows = []
    for ctx in contexts:
        window = sum(
            lk.fp16_bytes_per_token * min(ctx, lk.window or ctx)
            for lk in report.layers
            if lk.role == "sliding"
        )
        rows.append(
            KVMemoryRow(
                context=int(ctx),
                fp16_bytes=report.kv_bytes_per_token_fp16 * ctx + window,
                compressed_bytes=report.compressed_bytes_at(ctx) + window,
            )
        )
    return rows


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'`` (binary units, three significant figures)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n} B"


def kv_memory_markdown(report: ModelKVReport, contexts: Sequence[int]) -> str:
    """The README's KV memory table (markdown) for ``report`` at ``contexts``."""
    lines = [
        "| Context | fp16 KV cache | TurboQuant | Saved |",
        "|---:|---:|---:|---:|",
    ]
    for r in kv_memory_table(report, contexts):
        pct = 100 * r.saved_bytes / r.fp16_bytes if r.fp16_bytes else 0.0
        lines.append(
            f"| {r.context:,} | {human_bytes(r.fp16_bytes)} | {human_bytes(r.compressed_bytes)}"
            f" | {human_bytes(r.saved_bytes)} ({pct:.0f} %) |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- live caches


def _fp16_equivalent(cache: Any) -> int:
    """Bytes the tokens held by ``cache`` would take as float16 keys+values."""
    if isinstance(cache, CacheList):
        return sum(_fp16_equivalent(c) for c in cache.caches)
    fn = getattr(cache, "fp16_nbytes", None)
    if fn is not None:  # our cache knows its head dims
        return int(fn() if callable(fn) else fn)
    if isinstance(cache, QuantizedKVCache):
        if cache.keys is None:
            return 0
        b, h, _, w = cache.keys[0].shape
        kd = w * 32 // cache.bits
        vd = cache.values[0].shape[-1] * 32 // cache.bits
        return b * h * cache.offset * (kd + vd) * FP16_BYTES
    if isinstance(cache, (KVCache, RotatingKVCache)):
        if cache.keys is None:
            return 0
        tokens = cache.offset
        if isinstance(cache, RotatingKVCache):
            tokens = min(cache.offset, cache.max_size)
        b, h, _, kd = cache.keys.shape
        vd = cache.values.shape[-1]
        return b * h * tokens * (kd + vd) * FP16_BYTES
    arrays = [a for a in getattr(cache, "state", []) or [] if isinstance(a, mx.array)]
    return sum(a.size * FP16_BYTES for a in arrays)


def cache_memory(cache_list: Sequence[Any]) -> dict[str, int]:
    """``{"fp16_equivalent_bytes", "actual_bytes"}`` for a live per-layer cache list.

    ``actual_bytes`` is what the caches hold now (``nbytes``, preallocated steps included);
    ``fp16_equivalent_bytes`` what the same tokens would take as a float16 ``KVCache``.
    """
    fp16 = actual = 0
    for c in cache_list:
        fp16 += _fp16_equivalent(c)
        try:
            actual += int(c.nbytes)
        except (NotImplementedError, AttributeError, TypeError):
            pass
    return {"fp16_equivalent_bytes": int(fp16), "actual_bytes": int(actual)}


# --------------------------------------------------------------------------- CLI


def model_skeleton(path: str | Path) -> nn.Module:
    """An mlx-lm model built from ``config.json`` alone (weights left lazy, never loaded)."""
    from mlx_lm.utils import _get_classes, load_config

    p = Path(path).expanduser()
    config = json.loads(p.read_text()) if p.is_file() else load_config(p)
    model_cls, args_cls = _get_classes(config)
    return model_cls(args_cls.from_dict(config))


def _config_from_args(ns: argparse.Namespace) -> Any:
    from services.config import load_settings
    from services.turboquant.config import TurboQuantConfig

    overrides = {}
    for key, value in (
        ("tq_kv_bits", ns.bits),
        ("tq_kv_key_bits", ns.key_bits),
        ("tq_kv_value_bits", ns.value_bits),
        ("tq_kv_group_size", ns.group_size),
        ("tq_quantizer", ns.quantizer),
        ("tq_key_quantizer", ns.key_quantizer),
        ("tq_value_quantizer", ns.value_quantizer),
        ("tq_sink_tokens", ns.sink_tokens),
        ("tq_window", ns.window),
        ("tq_boundary_layers", ns.boundary_layers),
    ):
        if value is not None:
            overrides[key] = value
    return TurboQuantConfig.from_settings(load_settings(**overrides))


def format_layers(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'`` (compact layer lists for humans)."""
    parts: list[str] = []
    run: list[int] = []
    for i in indices:
        if run and i != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts) or "none"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the KV report and memory table for a model directory (config.json only)."""
    ap = argparse.ArgumentParser(prog="python -m services.hybrid_cache", description=main.__doc__)
    ap.add_argument(
        "--model", required=True, help="model directory, its config.json, or embedded:<name>"
    )
    ap.add_argument("--contexts", default="8192,32768,131072", help="comma-separated tokens")
    ap.add_argument("--bits", type=int, help="TQ_KV_BITS (default: from config.env)")
    ap.add_argument("--key-bits", type=int)
    ap.add_argument("--value-bits", type=int)
    ap.add_argument("--group-size", type=int)
    ap.add_argument("--quantizer", choices=["affine", "codebook"])
    ap.add_argument("--key-quantizer", choices=["", "affine", "codebook", "channel"])
    ap.add_argument("--value-quantizer", choices=["", "affine", "codebook"])
    ap.add_argument("--sink-tokens", type=int)
    ap.add_argument("--window", type=int)
    ap.add_argument("--boundary-layers", type=int)
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ns = ap.parse_args(argv)
    contexts = [int(c.replace("_", "")) for c in ns.contexts.split(",") if c.strip()]
    model_path = ns.model
    if model_path.startswith("embedded:"):
        from services.config import load_settings
        from services.models.embedded import resolve_model

        model_path = resolve_model(model_path, load_settings().resolved_models_dir)
    report = describe_model(model_skeleton(model_path), _config_from_args(ns))
    if ns.json:
        out = report.to_dict()
        out["memory"] = [
            dataclasses.asdict(r) | {"saved_bytes": r.saved_bytes}
            for r in kv_memory_table(report, contexts)
        ]
        print(json.dumps(out, indent=2))
        return 0
    print(f"model type:        {report.model_type} ({report.kind}, {report.num_layers} layers)")
    print(
        f"compressed layers: {format_layers(report.compressed_layers)} "
        f"({len(report.compressed_layers)} of {report.num_layers})"
    )
    if report.boundary_layers:
        print(f"boundary layers:   {format_layers(report.boundary_layers)}")
    if report.sliding_layers:
        print(f"sliding layers:    {format_layers(report.sliding_layers)} (left uncompressed)")
    if report.state_layers:
        print(f"state layers:      {len(report.state_layers)} (recurrent state, no KV cache)")
    print(
        f"KV bytes/token:    {report.kv_bytes_per_token_fp16:,} fp16 -> "
        f"{report.kv_bytes_per_token_compressed:,} compressed "
        f"({report.compression:.2f}x, {report.bits_per_element:.2f} bits/element)"
    )
    if report.full_precision_positions:
        print(
            f"full precision:    up to {report.full_precision_positions} positions per sequence "
            "(sink, window, a key group not yet full)"
        )
    print()
    print(kv_memory_markdown(report, contexts), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
