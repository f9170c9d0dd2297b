"""``TurboQuantConfig``: how the compressed KV cache quantizes, built from settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .quantizers import KEY_ONLY_QUANTIZERS, QUANTIZERS, SideSpec, make_side_spec


@dataclass(frozen=True)
class TurboQuantConfig:
    """Cache configuration (one per model; boundary layers get a modified copy).

    ``quantizer``: ``affine`` or ``codebook``; ``key_bits``/``value_bits`` per side
    (codebook sides above 4 bits fall back to affine); ``group_size`` for affine;
    ``use_rotation``/``use_normalization`` as documented in docs/turboquant.md;
    ``boundary_layers``/``boundary_bits``: the first and last N softmax layers at
    ``boundary_bits`` (16 or more: left unquantized); ``seed`` picks the rotation;
    ``center_keys``: store keys minus a fixed per-head mean (exact for attention, see
    docs/turboquant.md); ``key_quantizer``/``value_quantizer``: per-side override of
    ``quantizer`` (e.g. affine keys with codebook values; ``channel`` is keys only);
    ``sink_tokens``: the first positions kept in full precision (attention sinks);
    ``window``: the most recent positions kept in full precision before they are quantized.
    """

    key_bits: int = 4
    value_bits: int = 4
    group_size: int = 64
    quantizer: str = "affine"
    use_rotation: bool = True
    use_normalization: bool = True
    boundary_layers: int = 0
    boundary_bits: int = 8
    seed: int = 0
    center_keys: bool = True
    key_quantizer: str | None = None
    value_quantizer: str | None = None
    sink_tokens: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        for q in (self.quantizer, self.key_quantizer, self.value_quantizer):
            if q is not None and q not in QUANTIZERS:
                raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {q!r}")
        if self.boundary_layers < 0:
            raise ValueError("boundary_layers must be >= 0")
        if self.sink_tokens < 0 or self.window < 0:
            raise ValueError("sink_tokens and window must be >= 0")
        if (self.value_quantizer or self.quantizer) in KEY_ONLY_QUANTIZERS:
            raise ValueError("the 'channel' quantizer is for keys only")
        self.key_spec()
        self.value_spec()

    def key_spec(self) -> SideSpec:
        """The validated spec of the key side."""
        return make_side_spec(
            self.key_quantizer or self.quantizer,
            self.key_bits,
            self.group_size,
            self.use_normalization,
        )

    def value_spec(self) -> SideSpec:
        """The validated spec of the value side."""
        return make_side_spec(
            self.value_quantizer or self.quantizer,
            self.value_bits,
            self.group_size,
            self.use_normalization,
        )

    @classmethod
    def recommended(cls, **overrides: Any) -> TurboQuantConfig:
        """The stack's default (the ``TQ_*`` defaults): keys per channel in groups of 128
        positions, affine values, one sink position kept exact (docs/turboquant.md).

        The field defaults above are the paper's plain layout (every position quantized,
        per vector); this is what measured best (docs/benchmarks.md, KV cache configs).
        """
        base = dict(quantizer="affine", key_quantizer="channel", group_size=128, sink_tokens=1)
        return cls(**(base | overrides))

    @classmethod
    def from_settings(cls, settings: Any) -> TurboQuantConfig:
        """Build from ``services.config.Settings`` (the ``TQ_*`` keys)."""
        return cls(
            key_bits=int(settings.key_bits),
            value_bits=int(settings.value_bits),
            group_size=int(settings.tq_kv_group_size),
            quantizer=str(settings.tq_quantizer),
            use_rotation=bool(settings.tq_use_rotation),
            use_normalization=bool(settings.tq_use_normalization),
            boundary_layers=int(settings.tq_boundary_layers),
            boundary_bits=int(settings.tq_boundary_bits),
            seed=int(settings.tq_rotation_seed),
            center_keys=bool(settings.tq_center_keys),
            key_quantizer=settings.tq_key_quantizer or None,
            value_quantizer=settings.tq_value_quantizer or None,
            sink_tokens=int(settings.tq_sink_tokens),
            window=int(settings.tq_window),
        )
