"""Quantizers of rotated head vectors (pure functions).

Two kinds, chosen per side (keys, values) by a :class:`SideSpec`:

- ``affine``: ``mx.quantize`` group scale + bias (2/3/4/5/6/8 bits, group 32/64/128), stored
  as mlx-lm's ``QuantizedKVCache`` tuple ``(packed, scales, biases)``.
- ``codebook``: the paper's Lloyd-Max codebook for a rotated unit vector's coordinates
  (2/3/4 bits), stored as ``(packed indices, norms)``.
- ``channel`` (keys only): affine scale + bias per channel over groups of ``group_size``
  *positions* (KIVI's key layout), stored transposed: ``(packed (.., D, T*b/32), scales
  (.., D, T/g), biases)``. Key outliers sit in fixed channels; a per-channel range absorbs
  them, where a per-vector range lets one outlier channel coarsen all the others.

Normalization (``use_normalization``, our definition of TQ_USE_NORMALIZATION): *norm
baking*. Each vector is rescaled so that its dequantized form keeps the original L2
length, and the factor is folded into numbers stored anyway: the codebook's per-vector
norm becomes ``||x|| / ||c[idx]||``; affine scales and biases of the vector are multiplied
by ``||x|| / ||x_hat||``. No extra bytes. Off: raw norm / plain ``mx.quantize`` output.

Scales, biases and norms are float16 whatever the input dtype. Packing: see packing.py
and docs/turboquant.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .codebook import boundaries, centroids
from .packing import pack, packed_words, unpack

QUANTIZERS = ("affine", "codebook", "channel")
KEY_ONLY_QUANTIZERS = ("channel",)
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
CODEBOOK_BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128)
SIDE_DTYPE = mx.float16
_TINY = 1e-12


@dataclass(frozen=True)
class SideSpec:
    """How one side (keys or values) of a layer is quantized; resolved for a head dim."""

    quantizer: str
    bits: int
    group_size: int = 64
    use_normalization: bool = True

    def validate(self) -> SideSpec:
        """Raise ``ValueError`` for an unsupported combination; return self."""
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        allowed = CODEBOOK_BITS if self.quantizer == "codebook" else AFFINE_BITS
        if self.bits not in allowed:
            raise ValueError(f"{self.quantizer} supports bits {allowed}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")
        return self

    @property
    def per_channel(self) -> bool:
        """Groups run along positions (transposed layout), not along the head dim."""
        return self.quantizer == "channel"

    def for_dim(self, dim: int) -> SideSpec:
        """The spec actually used for vectors of ``dim``: group capped at ``dim``."""
        if self.per_channel:
            return self  # groups run over positions: the head dim does not bound them
        packed_words(dim, self.bits)  # raises for a head dim we cannot pack
        return SideSpec(
            self.quantizer, self.bits, min(self.group_size, dim), self.use_normalization
        )

    def effective_bits(self, dim: int) -> float:
        """Stored bits per element for vectors of ``dim``."""
        return effective_bits(self.quantizer, self.bits, dim, self.group_size)


def make_side_spec(
    quantizer: str, bits: int, group_size: int = 64, use_normalization: bool = True
) -> SideSpec:
    """A validated spec; a codebook side asked for more than 4 bits becomes affine."""
    if quantizer == "codebook" and bits > max(CODEBOOK_BITS):
        quantizer = "affine"  # e.g. boundary layers at 8 bits under TQ_QUANTIZER=codebook
    return SideSpec(quantizer, int(bits), int(group_size), bool(use_normalization)).validate()


def effective_bits(quantizer: str, bits: int, dim: int, group_size: int = 64) -> float:
    """Bits stored per element: affine ``b + 32/g`` (fp16 scale+bias), codebook ``b + 16/D``."""
    if quantizer == "channel":
        return bits + 2 * 16 / group_size
    if quantizer == "affine":
        return bits + 2 * 16 / min(group_size, dim)
    if quantizer == "codebook":
        return bits + 16 / dim
    raise ValueError(f"unknown quantizer {quantizer!r}")


def _norm(x: mx.array) -> mx.array:
    return mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))


# --------------------------------------------------------------------------- affine


def affine_quantize(
    x: mx.array, bits: int, group_size: int, normalize: bool = True
) -> tuple[mx.array, mx.array, mx.array]:
    """``(packed uint32, scales f16, biases f16)`` of ``x`` (``(..., D)``, any float dtype)."""
    x = x.astype(mx.float32)
    packed, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    scales, biases = scales.astype(SIDE_DTYPE), biases.astype(SIDE_DTYPE)
    if normalize:
        # Measure the length after the float16 rounding of scales and biases.
        x_hat = mx.dequantize(
            packed,
            scales.astype(mx.float32),
            biases.astype(mx.float32),
            group_size=group_size,
            bits=bits,
        )
        n_hat = _norm(x_hat)
        factor = mx.where(n_hat > _TINY, _norm(x) / mx.maximum(n_hat, _TINY), 1.0)
        scales = (scales.astype(mx.float32) * factor).astype(SIDE_DTYPE)
        biases = (biases.astype(mx.float32) * factor).astype(SIDE_DTYPE)
    return packed, scales, biases


def affine_dequantize(
    parts: tuple[mx.array, mx.array, mx.array], bits: int, group_size: int
) -> mx.array:
    """float32 ``(..., D)`` from an affine tuple."""
    packed, scales, biases = parts
    return mx.dequantize(
        packed,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=group_size,
        bits=bits,
    )


# --------------------------------------------------------------------------- codebook


def codebook_indices(u: mx.array, bits: int, dim: int) -> mx.array:
    """Nearest-centroid index (uint32) of each coordinate of unit-scaled ``u``.

    A branch-free binary search over the sorted thresholds: ``bits`` gathers of size
    ``u``, instead of a ``(..., D, 2^bits)`` comparison tensor.
    """
    thr = boundaries(bits, dim)
    idx = mx.zeros(u.shape, dtype=mx.uint32)
    for level in range(bits):
        step = 1 << (bits - 1 - level)
        mid = idx + step
        idx = mx.where(u > mx.take(thr, mid - 1), mid, idx)
    return idx


def codebook_quantize(x: mx.array, bits: int, normalize: bool = True) -> tuple[mx.array, mx.array]:
    """``(packed uint32 (..., D*b/32), norms f16 (...))`` of ``x`` (``(..., D)``)."""
    dim = x.shape[-1]
    x = x.astype(mx.float32)
    norm = _norm(x)
    u = x / mx.maximum(norm, _TINY)
    idx = codebook_indices(u, bits, dim)
    stored = norm
    if normalize:
        c_norm = _norm(mx.take(centroids(bits, dim), idx))
        stored = norm / mx.maximum(c_norm, _TINY)
    return pack(idx, bits), stored.squeeze(-1).astype(SIDE_DTYPE)


def codebook_dequantize(parts: tuple[mx.array, mx.array], bits: int) -> mx.array:
    """float32 ``(..., D)`` from a codebook tuple."""
    packed, norms = parts
    idx = unpack(packed, bits, mx.float32).astype(mx.uint32)
    dim = idx.shape[-1]
    return mx.take(centroids(bits, dim), idx) * norms.astype(mx.float32)[..., None]


# --------------------------------------------------------------------------- channel


def channel_quantize(x: mx.array, bits: int, group_size: int) -> tuple[mx.array, ...]:
    """``(packed (.., D, T*b/32), scales (.., D, T/g), biases)`` of ``x`` ``(.., T, D)``.

    ``T`` must be a multiple of ``group_size``. Norm baking does not apply: a group here
    spans many vectors.
    """
    xt = mx.swapaxes(x.astype(mx.float32), -1, -2)
    packed, scales, biases = mx.quantize(xt, group_size=group_size, bits=bits)
    return packed, scales.astype(SIDE_DTYPE), biases.astype(SIDE_DTYPE)


def channel_dequantize(parts: tuple[mx.array, ...], bits: int, group_size: int) -> mx.array:
    """float32 ``(.., T, D)`` from a channel tuple."""
    return mx.swapaxes(affine_dequantize(parts, bits, group_size), -1, -2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dispatch


def quantize(x: mx.array, spec: SideSpec) -> tuple[mx.array, ...]:
    """Quantize ``(..., D)`` vectors according to ``spec`` (already resolved for ``D``)."""
    if spec.quantizer == "affine":
        return affine_quantize(x, spec.bits, spec.group_size, spec.use_normalization)
    if spec.quantizer == "channel":
        return channel_quantize(x, spec.bits, spec.group_size)
    return codebook_quantize(x, spec.bits, spec.use_normalization)


def dequantize(parts: tuple[mx.array, ...], spec: SideSpec) -> mx.array:
    """The float32 vectors a stored tuple stands for."""
    if spec.quantizer == "affine":
        return affine_dequantize(parts, spec.bits, spec.group_size)  # type: ignore[arg-type]
    if spec.quantizer == "channel":
        return channel_dequantize(parts, spec.bits, spec.group_size)
    return codebook_dequantize(parts, spec.bits)  # type: ignore[arg-type]


def empty_parts(spec: SideSpec, lead: tuple[int, ...], dim: int) -> tuple[mx.array, ...]:
    """The stored tuple of zero positions (what a side holds before anything is quantized)."""
    words = mx.uint32
    if spec.per_channel:
        return (mx.zeros((*lead, dim, 0), words),) + 2 * (mx.zeros((*lead, dim, 0), SIDE_DTYPE),)
    packed = mx.zeros((*lead, 0, packed_words(dim, spec.bits)), words)
    if spec.quantizer == "codebook":
        return (packed, mx.zeros((*lead, 0), SIDE_DTYPE))
    return (packed,) + 2 * (mx.zeros((*lead, 0, dim // spec.group_size), SIDE_DTYPE),)


def num_parts(spec: SideSpec) -> int:
    """How many arrays one stored side has (affine and channel 3, codebook 2)."""
    return 2 if spec.quantizer == "codebook" else 3
