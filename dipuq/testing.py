"""Checkers that ship: identities any operator or network must satisfy, and analytic phantoms.

- :func:`check_adjoint` — the dot test ``|⟨A x, y⟩ − ⟨x, Aᵀ y⟩| / (‖A x‖ ‖y‖)`` for a
  :class:`~dipuq.operators.LinearOperator` (0 up to rounding for an exact adjoint; ≈1e-7 in
  float32 for dipuq's sparse backends).
- :func:`check_jvp_vjp` — the same identity for the Jacobian J of a function or network at x:
  ``|⟨J v, w⟩ − ⟨v, Jᵀ w⟩| / (‖J v‖ ‖w‖)`` with ``torch.func.jvp`` / ``torch.func.vjp``.
- :func:`ellipsoid` / :func:`ellipsoid_line_integrals` — a voxelised axis-aligned ellipsoid (with
  partial-volume supersampling) and its exact line integrals for a geometry's rays.

Example::

    >>> A = RayTransform(Geometry.parallel2d(np.linspace(0, np.pi, 10), (16, 16)))
    >>> check_adjoint(A) < 1e-5
    True
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dipuq.geometry import rays

__all__ = ["check_adjoint", "check_jvp_vjp", "ellipsoid", "ellipsoid_line_integrals"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() * b.detach().double()).sum())


def check_adjoint(op, n_trials: int = 3, generator: torch.Generator | None = None) -> float:
    """Worst relative dot-test error over ``n_trials`` Gaussian pairs (x, y) for ``op`` and ``op.adjoint``.

    Parameters
    ----------
    op : a LinearOperator (needs ``domain_shape``, ``range_shape``, ``dtype``, ``device``,
        ``__call__`` and ``adjoint``)
    n_trials : number of random pairs
    generator : a CPU torch.Generator for reproducibility (default: a fresh one seeded 0)
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(n_trials):
        x = torch.randn(op.domain_shape, generator=gen, dtype=op.dtype).to(op.device)
        y = torch.randn(op.range_shape, generator=gen, dtype=op.dtype).to(op.device)
        Ax, ATy = op(x), op.adjoint(y)
        denom = float(Ax.double().norm() * y.double().norm())
        err = abs(_dot(Ax, y) - _dot(x, ATy)) / denom if denom > 0 else abs(_dot(x, ATy))
        worst = max(worst, err)
    return worst


def check_jvp_vjp(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  generator: torch.Generator | None = None) -> float:
    """Relative mismatch ``|⟨J v, w⟩ − ⟨v, Jᵀ w⟩| / (‖J v‖ ‖w‖)`` of f's Jacobian J at x.

    ``J v`` comes from ``torch.func.jvp`` (forward mode) and ``Jᵀ w`` from ``torch.func.vjp``
    (reverse mode), so this checks that f's forward- and reverse-mode rules agree.
    ``v`` and ``w`` are Gaussian (from ``generator``, default seeded 0).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    fx, Jv = torch.func.jvp(f, (x,), (v,))
    w = torch.randn(fx.shape, generator=gen, dtype=fx.dtype).to(fx.device)
    _, vjp_fn = torch.func.vjp(f, x)
    (JTw,) = vjp_fn(w)
    denom = float(Jv.detach().double().norm() * w.double().norm())
    err = abs(_dot(Jv, w) - _dot(v, JTw))
    return err / denom if denom > 0 else err


def ellipsoid(vol_shape, centre, semi_axes, voxel_size: float = 1.0, value: float = 1.0,
              supersample: int = 4) -> np.ndarray:
    """A voxelised axis-aligned ellipsoid (2D: ellipse) with partial-volume edges.

    ``centre`` and ``semi_axes`` are given in world units in the volume's axis order
    ((y, x) or (z, y, x)), in dipuq coordinates (origin at the volume centre). Each voxel holds
    ``value`` × the fraction of its ``supersample**ndim`` sub-samples inside.
    """
    nd = len(vol_shape)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    axes = []
    for n in vol_shape:
        c = (np.arange(n) - (n - 1) / 2) * voxel_size
        axes.append((c[:, None] + sub[None, :] * voxel_size).reshape(-1))
    grids = np.meshgrid(*axes, indexing="ij")
    q = sum(((gr - c) / a) ** 2 for gr, c, a in zip(grids, centre, semi_axes))
    inside = (q <= 1).astype(np.float64)
    shp = []
    for n in vol_shape:
        shp += [n, supersample]
    inside = inside.reshape(shp).mean(axis=tuple(range(1, 2 * nd, 2)))
    return (value * inside).astype(np.float32)


def ellipsoid_line_integrals(geometry, centre, semi_axes, value: float = 1.0) -> np.ndarray:
    """Exact line integrals ``value × chord length`` of an ellipsoid for every ray, shape proj_shape."""
    a, e, tlo, thi = rays(geometry)
    if geometry.ndim == 2:
        centre3 = np.array([centre[1], centre[0], 0.0])
        axes3 = np.array([semi_axes[1], semi_axes[0], 1.0])
    else:
        centre3 = np.array([centre[2], centre[1], centre[0]], dtype=np.float64)
        axes3 = np.array([semi_axes[2], semi_axes[1], semi_axes[0]], dtype=np.float64)
    ap = (a - centre3) / axes3
    ep = e / axes3
    A2 = (ep * ep).sum(1)
    B2 = 2 * (ap * ep).sum(1)
    C2 = (ap * ap).sum(1) - 1
    disc = B2 * B2 - 4 * A2 * C2
    root = np.sqrt(np.clip(disc, 0, None))
    t1 = np.clip((-B2 - root) / (2 * A2), tlo, thi)
    t2 = np.clip((-B2 + root) / (2 * A2), tlo, thi)
    chord = np.where(disc > 0, np.clip(t2 - t1, 0, None), 0.0)
    return (value * chord).reshape(geometry.proj_shape)
