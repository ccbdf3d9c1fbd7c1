"""Preprocessing of scans: centre of rotation, sparse angles, crop, bin, repeated angles, stripes.

Raw counts become line integrals in :func:`dipuq.data.scan.line_integrals` (the relation a
:class:`~dipuq.data.Scan` with raw data holds).

- :func:`estimate_cor`: the rotation axis column, from the projections at θ and θ + 180°, which
  in parallel beam are mirror images of each other about the rotation axis. It goes into the
  geometry (``Geometry.cor_offset``, via :func:`cor_offset_for_axis`); data are never resampled.
- :func:`subsample_angles`: ``n`` evenly spaced projections (the sparse-angle case).
- :func:`crop` / :func:`bin`: smaller detector and volume with the geometry kept consistent.
- :func:`merge_repeated_angles`: average the frames taken at the same angle (tilt series often
  repeat tilts), or keep them all.
- :func:`remove_stripes`: suppress detector-column stripes in the sinogram (ring artefacts in
  the reconstruction) by a column-mean or a sorting-based filter.

Example::

    >>> sparse = subsample_angles(scan, 30)      # 30 evenly spaced angles
    >>> small = bin(crop(sparse, cols=(100, 500)), 4)
"""

from __future__ import annotations

import math

import numpy as np

from dipuq.data.scan import DEFAULT_FLOOR, Scan, line_integrals
from dipuq.errors import DataError
from dipuq.geometry import Geometry

__all__ = ["estimate_cor", "axis_column", "cor_offset_for_axis", "subsample_angles", "crop", "bin",
           "subsample_indices", "merge_repeated_angles", "repeated_angle_groups", "remove_stripes", "REPEATED",
           "STRIPE_METHODS"]

#: How :func:`merge_repeated_angles` treats frames of one angle.
REPEATED = ("mean", "keep")
#: Stripe filters of :func:`remove_stripes` ("none" = leave the sinogram as is).
STRIPE_METHODS = ("none", "mean", "sort")


def estimate_cor(sino, angles=None, *, max_angle_error_deg: float = 2.0) -> float:
    """Centre of rotation: the detector column the rotation axis projects onto, by mirror matching.

    In parallel beam the projection at θ + π is the projection at θ mirrored about the rotation
    axis: with the axis at column ``c`` (0-based pixel centres), ``p_{θ+π}[k] = p_θ[2c - k]``.
    Mirroring the second gives ``p_θ`` shifted by ``s = 2c - (cols - 1)``; ``s`` is found by
    least squares over integer shifts and refined on a 0.05-pixel grid with linear interpolation.

    Parameters
    ----------
    sino : (angles, cols) or (angles, rows, cols) line integrals (3D: rows are averaged)
    angles : radians; the pair closest to 180° apart is used. ``None``: first and last projection.
    max_angle_error_deg : refuse pairs that are further than this from 180° apart

    Returns
    -------
    The rotation axis column ``c`` (0-based, pixel centres at integers; add 0.5 for the
    "pixel edges at integers" convention of TomoPy / Savu). :func:`cor_offset_for_axis` turns
    it into a geometry's ``cor_offset``.
    """
    p = np.asarray(sino, dtype=np.float64)
    if p.ndim == 3:
        p = p.mean(axis=1)
    if p.ndim != 2 or p.shape[0] < 2:
        raise DataError(f"estimate_cor needs a sinogram (angles, cols) with >= 2 angles, got shape {p.shape}")
    if angles is None:
        i, j = 0, p.shape[0] - 1
    else:
        th = np.asarray(angles, dtype=np.float64).reshape(-1)
        if len(th) != p.shape[0]:
            raise DataError(f"angle count mismatch: {len(th)} angles for {p.shape[0]} projections")
        diff = np.abs(np.mod(th[None, :] - th[:, None], 2 * np.pi) - np.pi)  # shape: (angles, angles)
        i, j = np.unravel_index(np.argmin(diff), diff.shape)
        if np.degrees(diff[i, j]) > max_angle_error_deg:
            raise DataError(f"no two projections are 180° apart (closest pair: {180 - np.degrees(diff[i, j]):.2f}°)")
    p0, q = p[i], p[j][::-1]
    n = len(p0)
    k = np.arange(n, dtype=np.float64)

    def err(s: float) -> float:
        src = k + s
        ok = (src >= 0) & (src <= n - 1)
        return float(np.mean((q[ok] - np.interp(src[ok], k, p0)) ** 2))

    smax = n // 2
    coarse = np.arange(-smax, smax + 1)
    s0 = coarse[np.argmin([err(s) for s in coarse])]
    fine = np.arange(s0 - 1, s0 + 1.0001, 0.05)
    s = fine[np.argmin([err(s) for s in fine])]
    return float((n - 1 + s) / 2)


def axis_column(geometry: Geometry, angle_index: int = 0) -> float:
    """The detector column (0-based, fractional) that the rotation axis (the origin) projects onto.

    Computed from the geometry's vectors (so it follows whatever convention ``cor_offset`` has
    there): the ray through the origin — direction ``r`` in parallel beam, from the source
    ``r`` in fan / cone beam — meets the detector ``d + α u (+ β v)`` at column ``(cols-1)/2 + α``.
    """
    v = geometry.to_vectors()[angle_index]
    nd = geometry.ndim
    r, d, u = v[:nd], v[nd:2 * nd], v[2 * nd:3 * nd]
    direction, start = (r, np.zeros(nd)) if geometry.beam == "parallel" else (-r, r)
    cols = [direction, -u] + ([-v[3 * nd:]] if nd == 3 else [])
    lam_alpha = np.linalg.solve(np.stack(cols, 1), d - start)  # start + λ dir = d + α u (+ β v)
    return float((geometry.det_shape[-1] - 1) / 2 + lam_alpha[1])


def cor_offset_for_axis(axis: float, geometry: Geometry) -> float:
    """The ``cor_offset`` that puts the rotation axis on detector column ``axis`` in ``geometry``."""
    if geometry.is_vector:
        raise DataError("a vector geometry has no cor_offset: shift its detector vectors instead")
    a0 = axis_column(geometry.replace(cor_offset=0.0))
    a1 = axis_column(geometry.replace(cor_offset=1.0))
    return float((axis - a0) / (a1 - a0))


def subsample_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` evenly spaced indices into ``n_total`` angles, starting at 0: ``round(i n_total / n)``."""
    if not 1 <= n <= n_total:
        raise DataError(f"cannot pick {n} angles out of {n_total}")
    return np.round(np.arange(n) * (n_total / n)).astype(np.int64)


def subsample_angles(scan: Scan, n: int) -> Scan:
    """The scan restricted to ``n`` evenly spaced angles (sparse-angle CT).

    Example: ``subsample_angles(tooth, 30)`` keeps angles 0, 6, 12, ... of 181 (0°, 6°, …).
    """
    idx = subsample_indices(scan.geometry.n_angles, int(n))
    raw = {}
    if scan.has_raw:
        raw = dict(counts=scan.counts[idx])
    meta = {**scan.meta, "angle_indices": idx.tolist()}
    return scan.replace(projections=scan.projections[idx], geometry=scan.geometry.subset(idx), meta=meta, **raw)


def crop(scan: Scan, cols: int | tuple[int, int] | None = None, rows: tuple[int, int] | None = None,
         vol_xy: int | None = None) -> Scan:
    """Crop the detector and the volume consistently (parallel beam).

    Parameters
    ----------
    cols : detector column range ``(start, stop)``, or a width centred on the rotation axis.
        The rotation axis stays the volume centre, so ``cor_offset`` is recomputed exactly.
    rows : 3D only: detector row range ``(start, stop)``; the volume keeps the same z layers
        (needs voxel size = row spacing, i.e. row ``r`` ↔ slice ``r + (nz - rows) / 2``).
    vol_xy : new in-plane volume size; default: the field of view, i.e. the diameter (in voxels)
        of the circle that the kept columns see at every angle, of the same parity as before so
        that a reference volume can be centre-cropped.

    Raw counts, flat and dark fields are cropped with the projections; the reference too.
    """
    g = scan.geometry
    if g.beam != "parallel" or g.is_vector:
        raise DataError(f"crop supports (non-vector) parallel beam only, got {g.describe()}")
    p, ref = scan.projections, scan.reference
    raw = dict(counts=scan.counts, flat=scan.flat, dark=scan.dark) if scan.has_raw else {}
    vol = list(g.vol_shape)
    det = list(g.det_shape)
    cor = g.cor_offset
    ncols = det[-1]
    axis = axis_column(g)  # rotation axis, in column index units
    if cols is not None:
        if isinstance(cols, (int, np.integer)):
            start = int(round(axis - (int(cols) - 1) / 2))
            cols = (start, start + int(cols))
        c0, c1 = (int(c) for c in cols)
        if not 0 <= c0 < c1 <= ncols:
            raise DataError(f"column range ({c0}, {c1}) is outside the detector's {ncols} columns")
        p = p[..., c0:c1]
        raw = {k: v[..., c0:c1] for k, v in raw.items()}
        det[-1] = c1 - c0
        cor = cor_offset_for_axis(axis - c0, g.replace(det_shape=tuple(det)))
        if vol_xy is None:
            radius = min(axis - c0 + 0.5, c1 - 0.5 - axis) * g.det_spacing[-1] / g.voxel_size
            if radius <= 0:
                raise DataError(f"column range ({c0}, {c1}) does not contain the rotation axis at {axis:.2f}")
            vol_xy = int(math.floor(2 * radius))
            vol_xy -= (vol_xy - vol[-1]) % 2  # same parity: voxel centres stay on the old grid
    if vol_xy is not None:
        vol_xy = int(vol_xy)
        if vol_xy < 1:
            raise DataError(f"vol_xy must be >= 1, got {vol_xy}")
        if ref is not None:
            if (vol[-1] - vol_xy) % 2 or (vol[-2] - vol_xy) % 2 or vol_xy > min(vol[-2:]):
                raise DataError(f"cannot centre-crop the {tuple(vol[-2:])} reference to {vol_xy}²: "
                                "pick a smaller size of the same parity")
            a, b = (vol[-2] - vol_xy) // 2, (vol[-1] - vol_xy) // 2
            ref = ref[..., a:a + vol_xy, b:b + vol_xy]
        vol[-2] = vol[-1] = vol_xy
    if rows is not None:
        if g.ndim != 3:
            raise DataError("rows can only be cropped in a 3D scan")
        r0, r1 = (int(r) for r in rows)
        nrows = det[0]
        if not 0 <= r0 < r1 <= nrows:
            raise DataError(f"row range ({r0}, {r1}) is outside the detector's {nrows} rows")
        m = vol[0] - nrows
        if abs(g.det_spacing[0] - g.voxel_size) > 1e-9 * g.voxel_size or m % 2:
            raise DataError("cropping rows needs volume slices aligned with detector rows "
                            "(voxel_size == row spacing and an even difference between slices and rows)")
        p = p[:, r0:r1]
        raw = {k: (v[:, r0:r1] if k == "counts" else v[r0:r1]) for k, v in raw.items()}
        det[0] = r1 - r0
        k0, k1 = max(r0 + m // 2, 0), min(r1 + m // 2, vol[0])
        # The new volume covers the same z range as the kept rows.
        if (r0 + m // 2) < 0 or (r1 + m // 2) > vol[0]:
            raise DataError(f"rows ({r0}, {r1}) reach beyond the volume's {vol[0]} slices")
        if ref is not None:
            ref = ref[k0:k1]
        vol[0] = k1 - k0
    g2 = g.replace(vol_shape=tuple(vol), det_shape=tuple(det), cor_offset=float(cor))
    meta = {**scan.meta, "crop": {"cols": list(cols) if cols is not None else None,
                                  "rows": list(rows) if rows is not None else None, "vol_xy": vol_xy}}
    return Scan(p, g2, reference=ref, noise_std=scan.noise_std, name=scan.name, meta=meta, **raw)


def bin(scan: Scan, factor: int) -> Scan:  # noqa: A001 - the usual name for this operation
    """Bin the detector (cols, and rows in 3D) and the volume (every axis) by an integer ``factor``.

    Projections are averaged over ``factor`` (2D) or ``factor²`` (3D) detector pixels (a line
    integral averaged over a wider pixel), ``det_spacing`` and ``voxel_size`` grow by ``factor``,
    and ``cor_offset`` is recomputed in the new pixels. Sizes that ``factor`` does not divide
    are trimmed symmetrically (remainder split, extra pixel at the end). A reference volume is
    block-averaged; ``noise_std`` shrinks by ``sqrt(pixels per bin)`` (independent noise).
    Raw counts / flat / dark are dropped (the binned line integrals are not their ``-log``).
    """
    f = int(factor)
    if f < 1:
        raise DataError(f"bin factor must be a positive integer, got {factor}")
    if f == 1:
        return scan
    g = scan.geometry
    if g.is_vector:
        raise DataError("bin does not support vector geometries")
    det, vol = g.det_shape, g.vol_shape
    if min(det) < f or min(vol) < f:
        raise DataError(f"bin factor {f} is larger than the detector {det} or volume {vol}")
    # Detector: trim + block average along each detector axis.
    p = scan.projections
    ncols = det[-1]
    c0 = (ncols % f) // 2
    new_cols = ncols // f
    new_axis = (axis_column(g) - c0 - (f - 1) / 2) / f  # bin k merges columns c0 + kf … c0 + kf + f - 1
    p = _block_mean(p[..., c0:c0 + new_cols * f], f, axis=-1)
    new_det = [new_cols]
    if g.ndim == 3:
        nrows = det[0]
        r0 = (nrows % f) // 2
        shift_det = (r0 + (nrows // f * f - 1) / 2 - (nrows - 1) / 2) * g.det_spacing[0]
        nz = vol[0]
        z0 = (nz % f) // 2
        shift_vol = (z0 + (nz // f * f - 1) / 2 - (nz - 1) / 2) * g.voxel_size
        if g.beam == "cone" and shift_det != 0:
            raise DataError(f"binning {nrows} cone-beam rows by {f} would shift the detector: crop rows first")
        if g.beam == "parallel" and abs(shift_det - shift_vol) > 1e-9:
            raise DataError(f"binning by {f} would misalign {nrows} detector rows and {nz} volume slices: crop first")
        p = _block_mean(p[:, r0:r0 + nrows // f * f], f, axis=1)
        new_det = [nrows // f, new_cols]
    ref = scan.reference
    if ref is not None:
        if any((n % f) % 2 for n in vol):
            raise DataError(f"cannot bin the {vol} reference by {f} symmetrically: crop it to a multiple of {f} first")
        for ax, n in enumerate(vol):
            s = (n % f) // 2
            ref = _block_mean(np.take(ref, np.arange(s, s + n // f * f), axis=ax), f, axis=ax)
    spacing = tuple(s * f for s in g.det_spacing)
    g2 = g.replace(vol_shape=tuple(n // f for n in vol), det_shape=tuple(new_det), det_spacing=spacing,
                   voxel_size=g.voxel_size * f)
    g2 = g2.replace(cor_offset=cor_offset_for_axis(new_axis, g2))
    noise = None if scan.noise_std is None else scan.noise_std / math.sqrt(f ** (g.ndim - 1))
    meta = {**scan.meta, "bin": f * int(scan.meta.get("bin", 1))}
    return Scan(p, g2, reference=ref, noise_std=noise, name=scan.name, meta=meta)


def _block_mean(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    a = np.moveaxis(a, axis, -1)
    a = a.reshape(*a.shape[:-1], a.shape[-1] // f, f).mean(axis=-1, dtype=np.float64)
    return np.moveaxis(a, -1, axis).astype(np.float32)


def repeated_angle_groups(angles, atol_deg: float = 1e-3) -> list[np.ndarray]:
    """Indices of the projections that share an angle (within ``atol_deg``), one array per distinct
    angle, in order of first acquisition. Angles are compared as given (θ and θ + 360° differ)."""
    th = np.degrees(np.asarray(angles, dtype=np.float64).reshape(-1))
    order = np.argsort(th, kind="stable")
    new = np.concatenate([[True], np.diff(th[order]) > atol_deg])
    label = np.empty(len(th), np.int64)
    label[order] = np.cumsum(new) - 1
    groups = [np.flatnonzero(label == k) for k in range(int(label.max()) + 1 if len(th) else 0)]
    return sorted(groups, key=lambda g: g[0])


def merge_repeated_angles(scan: Scan, how: str = "mean", *, atol_deg: float = 1e-3) -> Scan:
    """The scan with the projections taken at the same angle merged into one (``how="mean"``) or kept.

    Tilt series repeat tilts (LiquidET's N6: 116 frames at 46 tilts, 1–4 each). ``"mean"``
    averages each angle's frames (raw counts are averaged and ``-log``-ed again), giving one
    projection per distinct angle in acquisition order; ``meta["frames_per_angle"]`` records how
    many frames each holds. ``"keep"`` returns the scan unchanged: the operator ``A`` then has one
    row block per frame, which is the exact model for independent noise per frame (averaged
    projections have noise variance σ²/k with k frames; ``noise_std`` is left as the per-frame value).
    A scan without repeated angles is returned as is.
    """
    if how not in REPEATED:
        raise DataError(f"repeated angles: use one of {', '.join(REPEATED)}, got {how!r}")
    g = scan.geometry
    if how == "keep" or g.is_vector:
        return scan
    groups = repeated_angle_groups(g.angles, atol_deg)
    if len(groups) == g.n_angles:
        return scan
    th = np.array([g.angles[i].mean() for i in groups])
    mean = lambda a: np.stack([a[i].mean(axis=0, dtype=np.float64) for i in groups]).astype(np.float32)  # noqa: E731
    meta = {**scan.meta, "frames_per_angle": [len(i) for i in groups], "repeated": "mean"}
    g2 = g.replace(angles=th)
    if scan.has_raw:
        counts = mean(scan.counts)
        y = line_integrals(counts, scan.flat, scan.dark, floor=float(scan.meta.get("floor", DEFAULT_FLOOR)))
        return scan.replace(projections=y, counts=counts, geometry=g2, meta=meta)
    return scan.replace(projections=mean(scan.projections), geometry=g2, meta=meta)


def remove_stripes(scan: Scan, method: str = "mean", size: int = 15) -> Scan:
    """The scan with vertical stripes of its sinograms suppressed (the cause of ring artefacts).

    A detector pixel whose gain is off by a constant adds the same error to every projection:
    a stripe along the angle axis of the sinogram, a ring around the rotation axis in the
    reconstruction. Per sinogram (each detector row in 3D):

    - ``"mean"``: subtract the high-pass part of the column mean, ``m - median_size(m)`` with
      ``m = mean over angles`` — removes constant offsets, keeps every object feature wider
      than ``size`` columns (a real object's column mean is smooth; a stripe is not);
    - ``"sort"``: Vo et al.'s sorting-based filter (Opt. Express 26, 2018): sort each column
      along the angles, median-filter across ``size`` columns, undo the sort — also handles
      stripes whose strength varies with intensity;
    - ``"none"``: unchanged.

    Raw counts / flat / dark are dropped (the filtered line integrals are no longer their
    ``-log``); ``meta["stripe"]`` records the filter.
    """
    from scipy.ndimage import median_filter  # heavy: imported only when a stripe filter runs

    if method not in STRIPE_METHODS:
        raise DataError(f"stripe filter: use one of {', '.join(STRIPE_METHODS)}, got {method!r}")
    if method == "none":
        return scan
    size = int(size)
    if size < 3 or size % 2 == 0:
        raise DataError(f"stripe filter size must be an odd number >= 3, got {size}")
    p = np.asarray(scan.projections, dtype=np.float64)
    sino = p[:, None, :] if p.ndim == 2 else p  # shape: (angles, rows, cols)
    out = np.empty_like(sino)
    for r in range(sino.shape[1]):
        s = sino[:, r, :]
        if method == "mean":
            m = s.mean(axis=0)
            out[:, r, :] = s - (m - median_filter(m, size=size, mode="reflect"))[None, :]
        else:
            idx = np.argsort(s, axis=0, kind="stable")
            srt = np.take_along_axis(s, idx, axis=0)
            filt = median_filter(srt, size=(1, size), mode="reflect")
            res = np.empty_like(s)
            np.put_along_axis(res, idx, filt, axis=0)
            out[:, r, :] = res
    y = out[:, 0, :] if p.ndim == 2 else out
    meta = {**scan.meta, "stripe": {"method": method, "size": size}}
    return Scan(y.astype(np.float32), scan.geometry, reference=scan.reference, noise_std=scan.noise_std,
                name=scan.name, meta=meta)
