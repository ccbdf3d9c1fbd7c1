"""The convention every file loader shares: a parallel-beam :class:`Scan` of line integrals, CoR in the geometry.

All loaders (:mod:`dipuq.data.tiff`, :mod:`dipuq.data.hdf5`, :mod:`dipuq.data.mat`) return line
integrals ``y`` (raw counts are flat/dark corrected and ``-log``-ed by
:func:`dipuq.data.scan.line_integrals`, and kept alongside) in a parallel-beam geometry whose
rotation axis is the volume's z axis:

- detector rows run along the rotation axis, so each detector row is the sinogram of one axial
  slice, and a 3D scan's volume is ``(rows, cols, cols)`` by default (voxel = detector pixel);
- the centre of rotation goes into ``Geometry.cor_offset``: ``cor="auto"`` estimates the axis
  column (:func:`~dipuq.data.preprocess.estimate_cor`), a number gives it directly (0-based
  pixel centres), ``cor_offset`` sets the geometry's offset as is.

Example::

    >>> scan = assemble_scan(sino, th, None, True, "auto", 0.0, None, None, "sinogram", {}, two_d=True)
"""

from __future__ import annotations

from dipuq.data.preprocess import cor_offset_for_axis, estimate_cor
from dipuq.data.scan import Scan, check_flat_dark, line_integrals
from dipuq.errors import DataError
from dipuq.geometry import Geometry

__all__ = ["assemble_scan", "parallel_geometry", "with_cor"]


def assemble_scan(y, th, raw, single_row, cor, cor_offset, vol_shape, floor, name, meta, two_d=False) -> Scan:
    """A parallel-beam Scan from a file's arrays, in the loaders' convention (module docs).

    Parameters
    ----------
    y : projections ``(angles, rows, cols)``, or ``(angles, cols)`` when ``two_d``; replaced by
        the line integrals of ``raw`` when that is given
    th : projection angles in radians, ``(angles,)``
    raw : None, or ``(counts, flat, dark)`` with averaged fields of the detector shape
    single_row : squeeze a one-row detector (``y`` and ``raw``) to a 2D scan
    cor, cor_offset : the centre of rotation, as in :func:`with_cor`
    vol_shape : the volume, default ``(cols, cols)`` in 2D and ``(rows, cols, cols)`` in 3D
    floor : transmission clip of :func:`~dipuq.data.scan.line_integrals` (with ``raw``)
    name, meta : the scan's label and facts
    """
    kw = {}
    if raw is not None:
        P, F, D = raw
        check_flat_dark(F, D)
        y = line_integrals(P, F, D, floor=floor)
        kw = dict(counts=P, flat=F, dark=D)
    if single_row and not two_d:
        y = y[:, 0]
        kw = {k: (v[:, 0] if k == "counts" else v[0]) for k, v in kw.items()}
    if y.ndim == 2:
        cols = y.shape[1]
        vol = tuple(vol_shape) if vol_shape is not None else (cols, cols)
        g = parallel_geometry(th, vol, (cols,))
    else:
        rows, cols = y.shape[1:]
        vol = tuple(vol_shape) if vol_shape is not None else (rows, cols, cols)
        g = parallel_geometry(th, vol, (rows, cols))
    g = with_cor(g, cor, cor_offset, y)
    return Scan(y, g, name=name, meta=meta, **kw)


def parallel_geometry(th, vol, det) -> Geometry:
    """The parallel-beam ``Geometry`` of angles ``th``, volume ``vol``, detector ``det``; a bad
    combination is a one-line :class:`DataError`."""
    try:
        return Geometry("parallel", th, vol, det)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def with_cor(g: Geometry, cor, cor_offset, y) -> Geometry:
    """``g`` with its ``cor_offset`` set from an axis column, ``"auto"`` (estimated) or an offset."""
    if cor is None:
        return g.replace(cor_offset=float(cor_offset))
    if isinstance(cor, str):
        if cor != "auto":
            raise DataError(f"cor must be a column number, 'auto' or None, got {cor!r}")
        cor = estimate_cor(y, g.angles)
    return g.replace(cor_offset=cor_offset_for_axis(float(cor), g))
