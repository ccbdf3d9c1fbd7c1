"""Loaders: NPZ scan files, TIFF stacks, HDF5 Data Exchange files and registry names → :class:`Scan`.

All loaders return line integrals ``y`` (raw counts are flat/dark corrected and ``-log``-ed by
:func:`dipuq.data.preprocess.line_integrals`, and kept alongside) in a parallel-beam geometry
whose rotation axis is the volume's z axis:

- detector rows run along the rotation axis, so each detector row is the sinogram of one axial
  slice, and a 3D scan's volume is ``(rows, cols, cols)`` by default (voxel = detector pixel);
- the centre of rotation goes into ``Geometry.cor_offset``: ``cor="auto"`` estimates the axis
  column (:func:`~dipuq.data.preprocess.estimate_cor`), a number gives it directly (0-based
  pixel centres), ``cor_offset`` sets the geometry's offset as is.

Example::

    >>> scan = load_scan("savu_24737", angle_start=10, cor="auto")   # a TIFF folder
    >>> scan = load_scan("tooth")                                     # a registry name
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from dipuq.data.preprocess import cor_offset_for_axis, estimate_cor, line_integrals
from dipuq.data.scan import DEFAULT_FLOOR, Scan, _average_fields, check_flat_dark, check_raw_shapes
from dipuq.errors import DataError
from dipuq.geometry import Geometry, to_radians

__all__ = ["load_scan", "load_npz", "load_tiff_stack", "load_hdf5", "read_angles"]

_TIFF = (".tif", ".tiff")


def load_scan(source: str | os.PathLike, **opts) -> Scan:
    """Load a scan from an ``.npz`` file, a TIFF-stack folder, an HDF5 file or a registry name.

    ``opts`` go to the matching loader (:func:`load_npz`, :func:`load_tiff_stack`,
    :func:`load_hdf5`, :func:`dipuq.data.registry.open_dataset`).
    """
    path = Path(source)
    if path.exists():
        if path.is_dir():
            return load_tiff_stack(path, **opts)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return load_npz(path, **opts)
        if suffix in (".h5", ".hdf5", ".hdf", ".nxs", ".cxi"):
            return load_hdf5(path, **opts)
        raise DataError(f"{path}: unknown scan file type {suffix!r} (use .npz, .h5/.hdf5 or a TIFF folder)")
    from dipuq.data.registry import DATASETS, open_dataset

    if str(source) in DATASETS:
        return open_dataset(str(source), **opts)
    raise DataError(f"no such scan file, folder or dataset: {source} (datasets: {', '.join(DATASETS)})")


def load_npz(path: str | os.PathLike, *, floor: float | None = None) -> Scan:
    """Read the NPZ scan format (``docs/scan-format.md``); same as :meth:`Scan.load`."""
    return Scan.load(path, floor=floor)


def read_angles(path: str | os.PathLike, units: str = "deg") -> np.ndarray:
    """Angles from a text file (one per line, or whitespace-separated), returned in radians."""
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=1).reshape(-1)
    except ValueError as exc:
        raise DataError(f"{path}: cannot read angles ({' '.join(str(exc).split())})") from None
    try:
        return to_radians(values, units)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def load_tiff_stack(folder: str | os.PathLike, *, projections: str | None = None, flat: str = "*flat*",
                    dark: str = "*dark*", angles: str | os.PathLike | np.ndarray | None = "angles.txt",
                    angle_units: str = "deg", angle_start: int = 0, angle_stride: int = 1,
                    cor: float | str | None = None, cor_offset: float = 0.0, slice_axis: str = "rows",
                    vol_shape: tuple[int, ...] | None = None, floor: float = DEFAULT_FLOOR,
                    name: str | None = None) -> Scan:
    """A 3D parallel-beam scan from a folder of TIFF images (one projection per file).

    Parameters
    ----------
    folder : the folder; projections may also sit in one sub-folder (e.g. ``tiffs/``)
    projections : glob for the projection files, relative to ``folder``; default: every
        ``*.tif``/``*.tiff`` in the folder or its sub-folders that is not a flat or dark field,
        in natural sort order (``raw_2`` before ``raw_10``)
    flat, dark : globs for flat and dark field images (several are averaged); no match: the
        images are taken to be line integrals already
    angles : angle file (relative to ``folder``; one angle per line), or an array
    angle_units : ``"deg"`` or ``"rad"`` for the angle file / array
    angle_start, angle_stride : projection ``i`` has the angle on line
        ``angle_start + i * angle_stride`` (0-based). The Diamond scan 24737 lists 110 angles for
        91 projections: ``angle_start=10``.
    cor : rotation-axis column (0-based pixel centres), ``"auto"`` to estimate it, or None
    cor_offset : the geometry's ``cor_offset`` in pixels, used as is when ``cor`` is None
    slice_axis : ``"rows"`` if the rotation axis runs across image rows (each image row is one
        slice's sinogram, the usual synchrotron layout), ``"cols"`` if images are transposed
    vol_shape : default ``(rows, cols, cols)``
    floor : transmission clip for ``-log`` (see :func:`~dipuq.data.preprocess.line_integrals`)
    """
    import tifffile

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    flats, darks = _glob(folder, flat), _glob(folder, dark)
    if projections is not None:
        files = _glob(folder, projections)
    else:
        skip = set(flats) | set(darks)
        files = [f for f in _natural_sorted([*folder.glob("*"), *folder.glob("*/*")])
                 if f.suffix.lower() in _TIFF and f not in skip and not _is_field(f.name)]
    if not files:
        raise DataError(f"no projection TIFFs found in {folder}")
    if bool(flats) != bool(darks):
        raise DataError(f"{folder}: found {'flat' if flats else 'dark'} fields but no "
                        f"{'dark' if flats else 'flat'} fields")
    if slice_axis not in ("rows", "cols"):
        raise DataError(f"slice_axis must be 'rows' or 'cols', got {slice_axis!r}")

    def read(f: Path) -> np.ndarray:
        try:
            im = np.asarray(tifffile.imread(f), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types
            raise DataError(f"{f}: unreadable TIFF ({' '.join(str(exc).split())})") from None
        if im.ndim != 2:
            raise DataError(f"{f}: expected a 2D image, got shape {im.shape}")
        return im.T if slice_axis == "cols" else im

    stack = [read(f) for f in files]
    shapes = {im.shape for im in stack}
    if len(shapes) != 1:
        raise DataError(f"{folder}: projection images differ in shape: {sorted(shapes)}")
    P = np.stack(stack)  # shape: (angles, rows, cols)
    n = len(P)
    th = _angles_for(folder, angles, angle_units, angle_start, angle_stride, n)
    raw = {}
    if flats:
        F = np.mean([read(f) for f in flats], axis=0).astype(np.float32)
        D = np.mean([read(f) for f in darks], axis=0).astype(np.float32)
        if F.shape != P.shape[1:] or D.shape != P.shape[1:]:
            raise DataError(f"flat {F.shape} / dark {D.shape} images do not match the projections {P.shape[1:]}")
        check_flat_dark(F, D)
        raw = dict(counts=P, flat=F, dark=D)
        y = line_integrals(P, F, D, floor=floor)
    else:
        y = P
    rows, cols = y.shape[1:]
    vol = tuple(vol_shape) if vol_shape is not None else (rows, cols, cols)
    g = _with_cor(_geometry("parallel", th, vol, (rows, cols)), cor, cor_offset, y)
    meta = {"source": str(folder), "n_files": n, "floor": floor, "angle_start": angle_start,
            "angle_stride": angle_stride, "slice_axis": slice_axis}
    return Scan(y, g, name=name or folder.name, meta=meta, **raw)


def load_hdf5(path: str | os.PathLike, *, row: int | None = None, angles=None, angle_units: str = "deg",
              cor: float | str | None = None, cor_offset: float = 0.0, vol_shape: tuple[int, ...] | None = None,
              floor: float = DEFAULT_FLOOR, name: str | None = None) -> Scan:
    """A parallel-beam scan from an HDF5 Data Exchange file (the tomopy / dxchange format).

    Reads ``exchange/data`` (angles, rows, cols) counts, ``exchange/data_white`` and
    ``exchange/data_dark`` (stacks, averaged) and ``exchange/theta`` (degrees by default).

    Parameters
    ----------
    row : one detector row → a 2D scan of that slice; None → 3D with all rows
    angles : override ``exchange/theta`` (in ``angle_units``)
    cor, cor_offset, vol_shape, floor : as in :func:`load_tiff_stack`
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({' '.join(str(exc).split())})") from None
    with f:
        if "exchange/data" not in f:
            raise DataError(f"{path}: no 'exchange/data' dataset (not a Data Exchange file)")
        P = np.asarray(f["exchange/data"][()], dtype=np.float32)
        if P.ndim == 2:
            P = P[:, None, :]
        if P.ndim != 3:
            raise DataError(f"{path}: exchange/data must be (angles, rows, cols), got shape {P.shape}")
        det = P.shape[1:]
        have_fields = "exchange/data_white" in f and "exchange/data_dark" in f
        if have_fields:
            F = _average_fields(f["exchange/data_white"][()], det, "exchange/data_white")
            D = _average_fields(f["exchange/data_dark"][()], det, "exchange/data_dark")
        if angles is None:
            if "exchange/theta" not in f:
                raise DataError(f"{path}: no 'exchange/theta'; pass angles=")
            angles = f["exchange/theta"][()]
    try:
        th = to_radians(angles, angle_units)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if len(th) != len(P):
        raise DataError(f"angle count mismatch: {len(th)} angles for {len(P)} projections in {path}")
    if row is not None:
        if not -det[0] <= row < det[0]:
            raise DataError(f"row {row} is outside the detector's {det[0]} rows")
        sl = slice(row % det[0], row % det[0] + 1)
        P = P[:, sl]
        if have_fields:
            F, D = F[sl], D[sl]
    raw = {}
    if have_fields:
        check_flat_dark(F, D)
        y = line_integrals(P, F, D, floor=floor)
        raw = dict(counts=P, flat=F, dark=D)
    else:
        y = P
    rows, cols = y.shape[1:]
    if row is not None:
        y = y[:, 0]
        raw = {k: v[:, 0] if k == "counts" else v[0] for k, v in raw.items()}
        vol = tuple(vol_shape) if vol_shape is not None else (cols, cols)
        g = _geometry("parallel", th, vol, (cols,))
    else:
        vol = tuple(vol_shape) if vol_shape is not None else (rows, cols, cols)
        g = _geometry("parallel", th, vol, (rows, cols))
    g = _with_cor(g, cor, cor_offset, y)
    if raw:
        check_raw_shapes(raw["counts"], raw["flat"], raw["dark"], g)
    meta = {"source": str(path), "floor": floor, "row": row}
    return Scan(y, g, name=name or path.stem, meta=meta, **raw)


# -- helpers -------------------------------------------------------------------------------
def _geometry(beam, th, vol, det) -> Geometry:
    try:
        return Geometry(beam, th, vol, det)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _with_cor(g: Geometry, cor, cor_offset, y) -> Geometry:
    """``g`` with its ``cor_offset`` set from an axis column, ``"auto"`` (estimated) or an offset."""
    if cor is None:
        return g.replace(cor_offset=float(cor_offset))
    if isinstance(cor, str):
        if cor != "auto":
            raise DataError(f"cor must be a column number, 'auto' or None, got {cor!r}")
        cor = estimate_cor(y, g.angles)
    return g.replace(cor_offset=cor_offset_for_axis(float(cor), g))


def _angles_for(folder, angles, units, start, stride, n) -> np.ndarray:
    if angles is None:
        raise DataError(f"{folder}: projection angles are needed (angles= file or array)")
    if isinstance(angles, (str, os.PathLike)):
        path = Path(folder) / angles
        if not path.is_file():
            raise DataError(f"angle file not found: {path}")
        th = read_angles(path, units)
    else:
        try:
            th = to_radians(angles, units)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    if start < 0 or stride < 1:
        raise DataError(f"angle_start must be >= 0 and angle_stride >= 1, got {start}, {stride}")
    idx = start + stride * np.arange(n)
    if idx[-1] >= len(th):
        raise DataError(f"angle count mismatch: {n} projections need angle lines {start}..{idx[-1]} "
                        f"(stride {stride}), but only {len(th)} angles are given")
    if start == 0 and stride == 1 and len(th) != n:
        raise DataError(f"angle count mismatch: {len(th)} angles for {n} projections "
                        "(pass angle_start= / angle_stride= to pick the matching lines)")
    return th[idx]


def _glob(folder: Path, pattern: str) -> list[Path]:
    return _natural_sorted([p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in _TIFF])


def _is_field(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in ("flat", "dark", "white", "bright"))


def _natural_sorted(paths) -> list[Path]:
    def key(p: Path):
        rel = str(p)
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", rel)]
    return sorted(paths, key=key)
