"""Phantoms: test volumes with known truth (simulated scans of them: :mod:`dipuq.operators.simulate`).

- :func:`shepp_logan`: the modified (high-contrast, Toft) Shepp–Logan phantom in 2D, and its 3D
  ellipsoid version; values in [0, 1] (skull 1, brain 0.2, ventricles 0, small features 0.3–0.4).
- :func:`random_ellipsoids`: a random sum of ellipses / ellipsoids, rescaled into [0, 1].

Phantom coordinates: the volume spans [-1, 1] along each axis (voxel centres at
``(i - (n - 1)/2) / (n/2)``). The in-plane y axis points *up* in image display (row 0 at the
top), so ``shepp_logan((128, 128))`` looks like the textbook picture with ``imshow``.

Example::

    >>> import torch
    >>> x = shepp_logan((64, 64))
    >>> float(x.min()), float(x.max())
    (0.0, 1.0)
    >>> blobs = random_ellipsoids((32, 32, 32), torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dipuq.errors import DataError

__all__ = ["shepp_logan", "random_ellipsoids", "ellipsoids"]

# Modified Shepp–Logan (Toft 1996): value, semi-axes (a, b, c), centre (x0, y0, z0), angle φ (deg,
# about z). The 2D phantom is the z = 0 section with the 2D semi-axes (a, b).
_SHEPP_LOGAN = (
    (1.0, (0.69, 0.92, 0.81), (0.0, 0.0, 0.0), 0.0),
    (-0.8, (0.6624, 0.874, 0.78), (0.0, -0.0184, 0.0), 0.0),
    (-0.2, (0.11, 0.31, 0.22), (0.22, 0.0, 0.0), -18.0),
    (-0.2, (0.16, 0.41, 0.28), (-0.22, 0.0, 0.0), 18.0),
    (0.1, (0.21, 0.25, 0.41), (0.0, 0.35, -0.15), 0.0),
    (0.1, (0.046, 0.046, 0.05), (0.0, 0.1, 0.25), 0.0),
    (0.1, (0.046, 0.046, 0.05), (0.0, -0.1, 0.25), 0.0),
    (0.1, (0.046, 0.023, 0.05), (-0.08, -0.605, 0.0), 0.0),
    (0.1, (0.023, 0.023, 0.02), (0.0, -0.606, 0.0), 0.0),
    (0.1, (0.023, 0.046, 0.02), (0.06, -0.605, 0.0), 0.0),
)


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Voxel-centre coordinates in [-1, 1]: ``[x, y]`` (2D) or ``[x, y, z]`` (3D), y pointing up."""
    axes = [(np.arange(n) - (n - 1) / 2) / (n / 2) for n in shape]
    if len(shape) == 2:
        y, x = np.meshgrid(-axes[0], axes[1], indexing="ij")
        return [x, y]
    z, y, x = np.meshgrid(axes[0], -axes[1], axes[2], indexing="ij")
    return [x, y, z]


def ellipsoids(shape: tuple[int, ...], params) -> np.ndarray:
    """Sum of indicator functions ``Σ v_e 1[point in ellipsoid e]`` on a grid, float32.

    Parameters
    ----------
    shape : (y, x) or (z, y, x)
    params : iterable of ``(value, semi_axes, centre, angle_deg)``; semi-axes and centre in the
        [-1, 1] phantom coordinates, ``(a, b[, c])`` along x, y[, z]; the angle rotates about z.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise DataError(f"phantom shape must be (y, x) or (z, y, x) with positive sizes, got {shape}")
    pts = _grid(shape)
    nd = len(shape)
    out = np.zeros(shape, dtype=np.float64)
    for value, axes, centre, angle in params:
        phi = math.radians(angle)
        dx, dy = pts[0] - centre[0], pts[1] - centre[1]
        u = dx * math.cos(phi) + dy * math.sin(phi)
        v = -dx * math.sin(phi) + dy * math.cos(phi)
        r2 = (u / axes[0]) ** 2 + (v / axes[1]) ** 2
        if nd == 3:
            r2 = r2 + ((pts[2] - centre[2]) / axes[2]) ** 2
        out += value * (r2 <= 1.0)
    return out.astype(np.float32)


def shepp_logan(shape: tuple[int, ...]) -> np.ndarray:
    """The modified Shepp–Logan phantom, values in [0, 1], shape (y, x) or (z, y, x)."""
    x = ellipsoids(shape, _SHEPP_LOGAN)
    return np.clip(x, 0.0, 1.0)  # exact sums are in [0, 1]; the clip only removes float round-off


def random_ellipsoids(shape: tuple[int, ...], generator: torch.Generator, n: int = 12,
                      max_axis: float = 0.4, min_axis: float = 0.05) -> np.ndarray:
    """A random sum of ``n`` ellipses / ellipsoids inside the unit disc / ball, rescaled into [0, 1].

    Values are uniform in (0.1, 1), semi-axes uniform in (``min_axis``, ``max_axis``), angles
    uniform, centres uniform in the disc of radius 0.6 (in the field of view of a
    parallel scan of the volume). The sum is divided by its maximum if that exceeds 1.

    Parameters
    ----------
    shape : (y, x) or (z, y, x)
    generator : the source of randomness (a seeded ``torch.Generator``)
    """
    if not isinstance(generator, torch.Generator):
        raise DataError("random_ellipsoids needs a torch.Generator (e.g. torch.Generator().manual_seed(0))")
    nd = len(shape)
    u = torch.rand(n, 5 + nd, generator=generator, dtype=torch.float64).numpy()
    params = []
    for row in u:
        value, angle = 0.1 + 0.9 * row[0], 360.0 * row[1]
        axes = tuple(min_axis + (max_axis - min_axis) * row[2:2 + nd])
        r, t, z = 0.6 * math.sqrt(row[2 + nd]), 2 * math.pi * row[3 + nd], 1.2 * (row[4 + nd] - 0.5)
        params.append((value, axes, (r * math.cos(t), r * math.sin(t), z), angle))
    x = ellipsoids(shape, params)
    m = float(x.max())
    return x / m if m > 1 else x
