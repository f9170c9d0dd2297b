"""Fixed orthogonal rotations of head vectors (pure functions, float32).

``M`` is a ``D x D`` orthogonal matrix chosen by ``(D, seed)``: a randomized Hadamard
matrix ``diag(s) H / sqrt(D)`` when ``D`` is a power of two, the Q factor of a seeded
Gaussian matrix otherwise. Vectors are row vectors: ``rotate(x) = x @ M`` and
``unrotate(y) = y @ M.T``. Because ``M`` is orthogonal, ``<x M, y M> = <x, y>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True, eq=False)
class Rotation:
    """One fixed rotation: either random signs + Hadamard, or a dense orthogonal matrix."""

    dim: int
    seed: int
    signs: mx.array | None  # (D,) float32 of +-1, Hadamard kind
    matrix: mx.array | None  # (D, D) float32, dense kind

    @property
    def kind(self) -> str:
        return "hadamard" if self.signs is not None else "dense"

    def as_matrix(self) -> mx.array:
        """The matrix ``M`` itself (float32), for tests and kernels."""
        if self.matrix is not None:
            return self.matrix
        return rotate(mx.eye(self.dim, dtype=mx.float32), self)


@lru_cache(maxsize=64)
def get_rotation(dim: int, seed: int = 0) -> Rotation:
    """The rotation for head dim ``dim`` and ``seed`` (built once, then cached)."""
    if dim <= 0:
        raise ValueError(f"head dim must be positive, got {dim}")
    # numpy's generator: the matrix must not depend on MLX's global random state.
    rng = np.random.default_rng([seed, dim])
    if is_power_of_two(dim):
        signs = rng.integers(0, 2, size=dim).astype(np.float32) * 2.0 - 1.0
        return Rotation(dim, seed, mx.array(signs), None)
    gauss = rng.standard_normal((dim, dim))
    q, r = np.linalg.qr(gauss)
    # Fix the column signs so the factorisation (and so M) is unique for a seed.
    q = q * np.sign(np.diag(r))[None, :]
    return Rotation(dim, seed, None, mx.array(q.astype(np.float32)))


def rotate(x: mx.array, rot: Rotation) -> mx.array:
    """``x @ M`` over the last axis, computed and returned in float32."""
    x = x.astype(mx.float32)
    if rot.signs is not None:
        # MLX's transform already carries the 1/sqrt(D) normalisation.
        return mx.hadamard_transform(x * rot.signs)
    return x @ rot.matrix


def unrotate(y: mx.array, rot: Rotation) -> mx.array:
    """``y @ M.T`` over the last axis (the inverse of :func:`rotate`), in float32."""
    y = y.astype(mx.float32)
    if rot.signs is not None:
        return mx.hadamard_transform(y) * rot.signs
    return y @ rot.matrix.T
