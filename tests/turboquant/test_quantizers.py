"""Quantizers: packing layout, codebook values, round-trip error per bits, normalization."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from services.turboquant.codebook import boundaries, centroids, lloyd_max
from services.turboquant.packing import pack, packed_words, unpack
from services.turboquant.quantizers import (
    SideSpec,
    affine_quantize,
    codebook_indices,
    dequantize,
    effective_bits,
    make_side_spec,
    quantize,
)
from services.turboquant.rotation import get_rotation, rotate


def _rel_mse(x_hat, x):
    return float(mx.sum((x_hat - x) ** 2) / mx.sum(x * x))


def _rotated(shape, seed):
    mx.random.seed(seed)
    x = mx.random.normal(shape)
    return rotate(x, get_rotation(shape[-1], 0))


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_roundtrip_and_matches_mx_quantize_layout(bits):
    n = 2**bits
    codes = mx.random.randint(0, n, (3, 5, 128)).astype(mx.uint32)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, packed_words(128, bits)) and packed.dtype == mx.uint32
    assert mx.array_equal(unpack(packed, bits).astype(mx.uint32), codes)
    # mx.quantize of integer-valued rows with the full range in every group stores
    # n-1-code with scale -1 (MLX's choice): its words must equal our packing of that.
    vals = codes.astype(mx.float32)
    vals[..., ::32] = 0.0
    vals[..., 1::32] = float(n - 1)
    w, s, b = mx.quantize(vals, group_size=32, bits=bits)
    assert mx.all(s == -1.0)
    assert mx.array_equal(w, pack((n - 1) - vals.astype(mx.uint32), bits))


def test_pack_rejects_bad_dims():
    with pytest.raises(ValueError):
        packed_words(80, 3)
    with pytest.raises(ValueError):
        packed_words(64, 7)


# --------------------------------------------------------------------------- codebook


def test_gaussian_lloyd_max_matches_published_tables():
    # Max (1960) / Lloyd: N(0,1) optimal levels.
    np.testing.assert_allclose(lloyd_max(1, "gaussian"), [-0.7979, 0.7979], atol=2e-4)
    np.testing.assert_allclose(
        lloyd_max(2, "gaussian"), [-1.5104, -0.4528, 0.4528, 1.5104], atol=2e-4
    )
    np.testing.assert_allclose(
        lloyd_max(3, "gaussian")[4:], [0.2451, 0.7560, 1.3440, 2.1520], atol=5e-4
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sphere_codebook_approaches_gaussian_for_large_dim(bits):
    big = lloyd_max(bits, "sphere", 4096) * np.sqrt(4096)
    np.testing.assert_allclose(big, lloyd_max(bits, "gaussian"), rtol=0.01, atol=0.01)
    c = np.array(centroids(bits, 64))
    assert np.all(np.diff(c) > 0) and np.allclose(c, -c[::-1], atol=1e-7)
    np.testing.assert_allclose(np.array(boundaries(bits, 64)), 0.5 * (c[1:] + c[:-1]), atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_indices_are_nearest_centroid(bits):
    u = mx.random.normal((1000,)) / 8.0
    idx = np.array(codebook_indices(u, bits, 64))
    c = np.array(centroids(bits, 64))
    brute = np.argmin(np.abs(np.array(u)[:, None] - c[None, :]), axis=1)
    np.testing.assert_array_equal(idx, brute)


# --------------------------------------------------------------------------- round trips


# Relative MSE bounds on rotated Gaussian vectors. Affine: ~1.3x the values measured at
# group 64 (group 128 gets 1.25x more). Codebook: the Lloyd-Max distortion of N(0,1)
# (0.1175, 0.03454, 0.009497 for 2, 3, 4 bits) plus 15 %: the rotated-sphere law is close.
AFFINE_BOUND = {8: 4e-5, 4: 1.1e-2, 3: 4.6e-2, 2: 0.19}
CODEBOOK_BOUND = {4: 0.009497 * 1.15, 3: 0.03454 * 1.15, 2: 0.1175 * 1.15}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_affine_roundtrip_error(bits, group):
    x = _rotated((4, 2, 64, 128), seed=bits * 100 + group)
    spec = make_side_spec("affine", bits, group).for_dim(128)
    parts = quantize(x, spec)
    assert [p.dtype for p in parts] == [mx.uint32, mx.float16, mx.float16]
    assert parts[1].shape == (4, 2, 64, 128 // group)
    err = _rel_mse(dequantize(parts, spec), x)
    assert err < AFFINE_BOUND[bits] * (1.0 if group <= 64 else 1.25)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [64, 128])
def test_codebook_roundtrip_error(bits, dim):
    x = _rotated((4, 2, 64, dim), seed=bits + dim)
    spec = make_side_spec("codebook", bits).for_dim(dim)
    packed, norms = quantize(x, spec)
    assert packed.shape == (4, 2, 64, dim * bits // 32) and norms.shape == (4, 2, 64)
    err = _rel_mse(dequantize((packed, norms), spec), x)
    assert err < CODEBOOK_BOUND[bits]


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 64), (4, 128)])
def test_codebook_beats_affine_at_equal_bits_on_rotated_data(bits, group):
    # The paper's claim on the distribution it was designed for, with fewer stored bits
    # (codebook b + 0.125 vs affine b + 0.5 or + 0.25). At 4 bits affine g64 (4.5 bits)
    # is slightly better than the 4.125-bit codebook, so compare with g128 there.
    x = _rotated((8, 64, 128), seed=bits)
    cb = make_side_spec("codebook", bits).for_dim(128)
    af = make_side_spec("affine", bits, group).for_dim(128)
    assert _rel_mse(dequantize(quantize(x, cb), cb), x) < _rel_mse(
        dequantize(quantize(x, af), af), x
    )


@pytest.mark.parametrize(
    "quantizer,bits", [("affine", 2), ("affine", 3), ("codebook", 2), ("codebook", 3)]
)
def test_normalization_keeps_length(quantizer, bits):
    x = _rotated((16, 32, 64), seed=7) * mx.random.uniform(0.1, 30.0, (16, 32, 1))
    n = mx.sqrt(mx.sum(x * x, axis=-1))
    on = make_side_spec(quantizer, bits, 64, True).for_dim(64)
    off = make_side_spec(quantizer, bits, 64, False).for_dim(64)
    len_on = mx.sqrt(mx.sum(dequantize(quantize(x, on), on) ** 2, axis=-1)) / n
    len_off = mx.sqrt(mx.sum(dequantize(quantize(x, off), off) ** 2, axis=-1)) / n
    assert float(mx.max(mx.abs(len_on - 1))) < 2e-3  # float16 rounding only
    assert float(mx.max(mx.abs(len_off - 1))) > 1e-2  # off really is different


def test_zero_vectors_survive():
    x = mx.zeros((2, 64))
    for spec in (
        make_side_spec("affine", 4).for_dim(64),
        make_side_spec("codebook", 4).for_dim(64),
    ):
        out = dequantize(quantize(x, spec), spec)
        assert not bool(mx.any(mx.isnan(out))) and float(mx.max(mx.abs(out))) == 0.0


def test_affine_normalization_scales_bias_too():
    x = _rotated((4, 64), seed=3) + 0.5
    p_on = affine_quantize(x, 3, 64, True)
    p_off = affine_quantize(x, 3, 64, False)
    assert mx.array_equal(p_on[0], p_off[0])  # same codes: only scale and bias change
    ratio = p_on[1].astype(mx.float32) / p_off[1].astype(mx.float32)
    np.testing.assert_allclose(np.array(p_on[2] / p_off[2]), np.array(ratio), rtol=2e-3)


def test_effective_bits():
    assert effective_bits("affine", 4, 128, 64) == 4.5
    assert effective_bits("affine", 4, 64, 32) == 5.0
    assert effective_bits("codebook", 3, 128) == 3.125
    assert effective_bits("codebook", 4, 64) == 4.25
    assert effective_bits("affine", 4, 32, 64) == 5.0  # group capped at the head dim
    assert make_side_spec("codebook", 3).effective_bits(128) == 3.125


def test_spec_validation_and_codebook_fallback():
    assert make_side_spec("codebook", 8).quantizer == "affine"
    for bad in [("affine", 7, 64), ("codebook", 1, 64), ("affine", 4, 48), ("lut", 4, 64)]:
        with pytest.raises(ValueError):
            SideSpec(*bad).validate()


@pytest.mark.parametrize(
    "quantizer,bits,group", [("affine", 4, 64), ("affine", 3, 32), ("codebook", 3, 64),
                             ("channel", 4, 128), ("channel", 3, 32)],
)  # fmt: skip
def test_empty_parts_have_the_form_of_quantized_parts(quantizer, bits, group):
    from services.turboquant.quantizers import empty_parts, make_side_spec, quantize

    spec = make_side_spec(quantizer, bits, group).for_dim(64)
    full = quantize(mx.random.normal((1, 3, 128, 64)), spec)
    empty = empty_parts(spec, (1, 3), 64)
    assert len(empty) == len(full)
    for e, f in zip(empty, full, strict=True):
        assert e.dtype == f.dtype and e.size == 0
        # same shape, with the position axis (the one that grows) at zero
        axis = f.ndim - 1 if spec.per_channel else 2
        assert e.shape == f.shape[:axis] + (0,) + f.shape[axis + 1 :]
