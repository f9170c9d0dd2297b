"""Rotations: orthogonal, inner products kept, exact inverse, deterministic per seed."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from services.turboquant.rotation import get_rotation, is_power_of_two, rotate, unrotate


@pytest.mark.parametrize("dim", [32, 64, 128, 256, 80, 96])
def test_matrix_is_orthogonal(dim):
    rot = get_rotation(dim, seed=3)
    m = np.array(rot.as_matrix(), dtype=np.float64)
    assert rot.kind == ("hadamard" if is_power_of_two(dim) else "dense")
    np.testing.assert_allclose(m @ m.T, np.eye(dim), atol=1e-5)
    # Not the identity (or a signed permutation): every entry is spread.
    assert np.max(np.abs(m)) < 0.9


@pytest.mark.parametrize("dim", [64, 128, 96])
def test_inner_products_and_inverse(dim):
    rot = get_rotation(dim, seed=1)
    q = mx.random.normal((3, 5, dim))
    k = mx.random.normal((3, 7, dim)) * 4.0
    qr, kr = rotate(q, rot), rotate(k, rot)
    assert qr.dtype == mx.float32
    np.testing.assert_allclose(
        np.array(qr @ kr.swapaxes(-1, -2)), np.array(q @ k.swapaxes(-1, -2)), atol=1e-3, rtol=1e-4
    )
    np.testing.assert_allclose(np.array(unrotate(kr, rot)), np.array(k), atol=1e-4)


def test_rotate_matches_matrix_product():
    rot = get_rotation(64, seed=5)
    x = mx.random.normal((4, 64))
    np.testing.assert_allclose(np.array(rotate(x, rot)), np.array(x @ rot.as_matrix()), atol=1e-5)


def test_seed_determines_matrix():
    a = np.array(get_rotation(64, 0).as_matrix())
    get_rotation.cache_clear()
    mx.random.seed(1234)  # the global MLX seed must not matter
    b = np.array(get_rotation(64, 0).as_matrix())
    c = np.array(get_rotation(64, 1).as_matrix())
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_rotation_spreads_an_outlier_channel():
    # The point of rotating: one huge channel becomes D small ones.
    x = mx.zeros((1, 128)).at[0, 7].add(100.0)
    y = np.array(rotate(x, get_rotation(128, 0)))
    assert np.max(np.abs(y)) < 100.0 / np.sqrt(128) + 1e-3


def test_half_precision_input_is_rotated_in_float32():
    rot = get_rotation(64, 0)
    x = mx.random.normal((2, 64)).astype(mx.float16)
    assert rotate(x, rot).dtype == mx.float32
