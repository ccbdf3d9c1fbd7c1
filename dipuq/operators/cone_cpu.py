"""dipuq's own CPU projector for 3D cone beam (and 3D parallel, and any vector geometry).

Mathematically: the line integral ``(A f)(ray) = ∫ f̃(a + t e) dt`` of the *trilinear
interpolant* ``f̃`` of the voxel values (zero outside the volume), along each ray from the source
(or, for parallel beams, along the direction ``r``) through the centre of each detector pixel,
integrated by the midpoint rule with a step of at most ``step * voxel_size`` (default half a
voxel). Every sample spreads its weight ``Δt`` over the 8 voxels of its interpolation cell, so the
operator is a sparse matrix; it is built ONCE, vectorised with numpy over blocks of rays, and
stored as a CSR pair (A and Aᵀ), so the adjoint is exact to float rounding.

Conventions are dipuq's (see :mod:`dipuq.geometry`), which are ASTRA's 3D conventions: ray of
detector pixel ``(row, col)`` hits ``d + (col - (cols-1)/2) u + (row - (rows-1)/2) v``; cone rays
start at the source ``r``; line integrals are in world length units (voxel_size units).
2D geometries are lifted to one-slice 3D ones (:func:`dipuq.geometry.lift3d`), so this projector also serves as
an independent cross-check of ASTRA's 2D projectors.

Example::

    >>> g = Geometry.cone3d(np.linspace(0, 2*np.pi, 8, endpoint=False), (8, 8, 8), (8, 12), 40, 20)
    >>> M = build_matrix(g)
    >>> M.shape
    (768, 512)
"""

from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp

from dipuq.errors import DipuqError
from dipuq.geometry import Geometry, lift3d, rays

__all__ = ["build_matrix"]


def _block_matrix(a, e, tlo, thi, vol_shape, voxel_size, step):
    """CSR block (len(a) × n_voxels) of the trilinear ray-driven projector for these rays."""
    nz, ny, nx = vol_shape
    n_vox = nz * ny * nx
    dims = np.array([nx, ny, nz], dtype=np.float64)  # x, y, z order, like the coordinates
    half = (dims + 1) / 2 * voxel_size  # support of the interpolant: one voxel beyond the centres
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / e
        t1 = (-half - a) * inv
        t2 = (half - a) * inv
    axis_par = e == 0  # ray parallel to a slab: all or nothing
    inside = np.abs(a) < half
    t1 = np.where(axis_par, np.where(inside, -np.inf, np.inf), t1)
    t2 = np.where(axis_par, np.where(inside, np.inf, -np.inf), t2)
    t_in = np.maximum(np.minimum(t1, t2).max(1), tlo)
    t_out = np.minimum(np.maximum(t1, t2).min(1), thi)
    length = np.where(t_out > t_in, t_out - t_in, 0.0)
    h = step * voxel_size
    nk = np.ceil(length / h).astype(np.int64)
    dt = np.where(nk > 0, length / np.maximum(nk, 1), 0.0)  # ≤ h: midpoint rule on [t_in, t_out]
    total = int(nk.sum())
    R = len(a)
    if total == 0:
        return sp.csr_matrix((R, n_vox), dtype=np.float64)
    ray = np.repeat(np.arange(R), nk)  # shape: (S,) one entry per sample
    first = np.cumsum(nk) - nk
    k = np.arange(total) - np.repeat(first, nk)
    t = t_in[ray] + (k + 0.5) * dt[ray]
    f = (a[ray] + t[:, None] * e[ray]) / voxel_size + (dims - 1) / 2  # shape: (S, 3) index coords
    i0 = np.floor(f)
    w1 = f - i0
    i0 = i0.astype(np.int64)
    w = dt[ray]
    rows_, cols_, vals_ = [], [], []
    for cz in (0, 1):
        iz = i0[:, 2] + cz
        wz = w * (w1[:, 2] if cz else 1 - w1[:, 2])
        okz = (iz >= 0) & (iz < nz)
        for cy in (0, 1):
            iy = i0[:, 1] + cy
            wzy = wz * (w1[:, 1] if cy else 1 - w1[:, 1])
            okzy = okz & (iy >= 0) & (iy < ny)
            for cx in (0, 1):
                ix = i0[:, 0] + cx
                wv = wzy * (w1[:, 0] if cx else 1 - w1[:, 0])
                ok = okzy & (ix >= 0) & (ix < nx) & (wv != 0)
                rows_.append(ray[ok])
                cols_.append((iz[ok] * ny + iy[ok]) * nx + ix[ok])
                vals_.append(wv[ok])
    coo = sp.coo_matrix((np.concatenate(vals_), (np.concatenate(rows_), np.concatenate(cols_))), shape=(R, n_vox))
    return coo.tocsr()  # sums the duplicates (neighbouring samples share voxels)


def build_matrix(geometry: Geometry, step: float = 0.5, samples_per_block: int = 400_000,
                 verbose: bool = False) -> sp.csr_matrix:
    """The projection matrix A (CSR, float64) of shape ``(n_views*rows*cols, nz*ny*nx)``.

    Rows are ordered ``(view, row, col)`` (dipuq's projection layout), columns ``(z, y, x)``.
    ``step`` is the sampling step along each ray in voxels (≤ 0.5 recommended);
    ``samples_per_block`` bounds the memory of one vectorised block (≈ 200 bytes per sample).
    """
    if not (0 < step <= 1):
        raise DipuqError(f"step must be in (0, 1] voxels, got {step}")
    t0 = time.perf_counter()
    _, vol_shape, (rows, cols), vec = lift3d(geometry)
    n_views = len(vec)
    diag = math.sqrt(sum((n + 1) ** 2 for n in vol_shape))
    per_view = rows * cols * (diag / step + 1)  # upper bound on samples of one view
    views_per_block = max(1, int(samples_per_block // per_view))
    blocks = []
    for v0 in range(0, n_views, views_per_block):
        idx = np.arange(v0, min(n_views, v0 + views_per_block))
        a, e, tlo, thi = rays(geometry, idx)
        if views_per_block == 1 and per_view > samples_per_block:
            # one view is too big: split its rays
            n_split = int(math.ceil(per_view / samples_per_block))
            for part in np.array_split(np.arange(len(a)), n_split):
                blocks.append(_block_matrix(a[part], e[part], tlo[part], thi[part], vol_shape,
                                            geometry.voxel_size, step))
        else:
            blocks.append(_block_matrix(a, e, tlo, thi, vol_shape, geometry.voxel_size, step))
    M = sp.vstack(blocks, format="csr")
    M.eliminate_zeros()
    M.sort_indices()
    if verbose:
        print(f"cpu-cone matrix {M.shape}, nnz {M.nnz:,}, built in {time.perf_counter() - t0:.1f} s")
    return M
