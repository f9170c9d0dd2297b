"""Lloyd-Max scalar codebooks for the coordinates of a rotated unit vector.

After a random rotation, one coordinate of a unit vector in ``R^D`` has the density
``f(x) ∝ (1 - x^2)^((D-3)/2)`` on ``[-1, 1]`` (close to N(0, 1/D) for large D). The
MSE-optimal scalar quantizer of that density with ``2^b`` levels (Lloyd-Max) is what the
TurboQuant paper stores per coordinate. We compute it once per ``(bits, D)`` by Lloyd
iterations on a fine grid (numpy, float64) and cache it.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

CODEBOOK_BITS = (1, 2, 3, 4)
_GRID = 200_001


def _grid_density(kind: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "gaussian":
        x = np.linspace(-8.0, 8.0, _GRID)
        w = np.exp(-0.5 * x * x)
    elif kind == "sphere":
        x = np.linspace(-1.0, 1.0, _GRID)
        # Work in log space: the exponent is large for big D.
        with np.errstate(divide="ignore"):
            logw = 0.5 * (dim - 3) * np.log1p(-np.minimum(x * x, 1.0))
        w = np.exp(logw - np.max(logw))
        if dim <= 3:
            w = np.ones_like(x)  # D = 3: uniform; smaller dims are not head dims
    else:
        raise ValueError(f"unknown density {kind!r}")
    return x, w / w.sum()


def lloyd_max(bits: int, kind: str = "sphere", dim: int = 128, iters: int = 500) -> np.ndarray:
    """Sorted Lloyd-Max centroids (float64, ``2^bits`` values) for a density.

    ``kind="gaussian"``: the standard normal (``dim`` ignored), for checking against the
    published tables; ``kind="sphere"``: a coordinate of a uniform unit vector in ``R^dim``.
    """
    if bits not in CODEBOOK_BITS:
        raise ValueError(f"codebook bits must be one of {CODEBOOK_BITS}, got {bits}")
    x, w = _grid_density(kind, dim)
    cw = np.cumsum(w)
    cxw = np.cumsum(w * x)
    n = 2**bits
    # Start from quantiles: always inside the support, already close for smooth densities.
    c = np.interp((np.arange(n) + 0.5) / n, cw, x)
    for _ in range(iters):
        bounds = 0.5 * (c[1:] + c[:-1])
        idx = np.searchsorted(x, bounds)
        edges = np.concatenate([[0], idx, [len(x)]])
        mass = np.diff(np.concatenate([[0.0], cw])[edges])
        first = np.diff(np.concatenate([[0.0], cxw])[edges])
        new = np.where(mass > 0, first / np.maximum(mass, 1e-300), c)
        if np.max(np.abs(new - c)) < 1e-12:
            c = new
            break
        c = new
    c = np.sort(c)
    # Both densities are symmetric: remove the grid's tiny asymmetry.
    return 0.5 * (c - c[::-1])


@lru_cache(maxsize=32)
def centroids(bits: int, dim: int) -> mx.array:
    """float32 ``(2^bits,)`` ascending centroids for unit vectors in ``R^dim``."""
    return mx.array(lloyd_max(bits, "sphere", dim).astype(np.float32))


@lru_cache(maxsize=32)
def boundaries(bits: int, dim: int) -> mx.array:
    """float32 ``(2^bits - 1,)`` decision thresholds (midpoints between centroids)."""
    c = lloyd_max(bits, "sphere", dim)
    return mx.array((0.5 * (c[1:] + c[:-1])).astype(np.float32))
