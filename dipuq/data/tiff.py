"""TIFF loaders: a folder of projection images (with flats and darks), or one sinogram image.

Both return line integrals in a parallel-beam geometry with the centre of rotation in the
geometry (the convention of :mod:`dipuq.data.assemble`).

Example::

    >>> scan = load_tiff_stack("savu_24737", angle_start=10, cor="auto")
    >>> scan = load_sinogram("woodsino_0200.tif", arc_deg=360)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from dipuq.data.assemble import assemble_scan, parallel_geometry, with_cor
from dipuq.data.preprocess import merge_repeated_angles
from dipuq.data.scan import DEFAULT_FLOOR, Scan, check_flat_dark, line_integrals
from dipuq.errors import DataError
from dipuq.geometry import to_radians

__all__ = ["load_tiff_stack", "load_sinogram", "read_angles", "read_tiff", "TIFF_SUFFIXES"]

TIFF_SUFFIXES = (".tif", ".tiff")


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
    floor : transmission clip for ``-log`` (see :func:`~dipuq.data.scan.line_integrals`)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    flats, darks = _glob(folder, flat), _glob(folder, dark)
    if projections is not None:
        files = _glob(folder, projections)
    else:
        skip = set(flats) | set(darks)
        files = [f for f in _natural_sorted([*folder.glob("*"), *folder.glob("*/*")])
                 if f.suffix.lower() in TIFF_SUFFIXES and f not in skip and not _is_field(f.name)]
    if not files:
        raise DataError(f"no projection TIFFs found in {folder}")
    if bool(flats) != bool(darks):
        raise DataError(f"{folder}: found {'flat' if flats else 'dark'} fields but no "
                        f"{'dark' if flats else 'flat'} fields")
    if slice_axis not in ("rows", "cols"):
        raise DataError(f"slice_axis must be 'rows' or 'cols', got {slice_axis!r}")

    def read(f: Path) -> np.ndarray:
        im = read_tiff(f)
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
    g = with_cor(parallel_geometry(th, vol, (rows, cols)), cor, cor_offset, y)
    meta = {"source": str(folder), "n_files": n, "floor": floor, "angle_start": angle_start,
            "angle_stride": angle_stride, "slice_axis": slice_axis}
    return Scan(y, g, name=name or folder.name, meta=meta, **raw)


def load_sinogram(path: str | os.PathLike, *, angles=None, angle_units: str = "deg", arc_deg: float | None = None,
                  transpose: bool = False, cor: float | str | None = None, cor_offset: float = 0.0,
                  vol_shape: tuple[int, ...] | None = None, repeated: str = "mean", name: str | None = None) -> Scan:
    """A 2D parallel-beam scan from one TIFF image holding a sinogram of line integrals ``(angles, cols)``.

    The image is taken as already normalised (flat/dark corrected and ``-log``-ed), as neutron
    and synchrotron facilities often publish it.

    Parameters
    ----------
    angles : angle file (one per line; relative to the image's folder) or an array, in ``angle_units``
    arc_deg : instead of ``angles``: the projections cover this arc evenly in order, starting at
        0 (``arange(n) * arc / n``; e.g. 360 for PSI's wood sinogram)
    transpose : the image is ``(cols, angles)``
    cor, cor_offset, vol_shape : as in :func:`load_tiff_stack` (volume default ``(cols, cols)``)
    repeated : see :func:`~dipuq.data.preprocess.merge_repeated_angles`
    """
    path = Path(path)
    y = read_tiff(path)
    if y.ndim != 2:
        raise DataError(f"{path}: a sinogram image is 2D (angles, cols), got shape {y.shape}")
    y = np.ascontiguousarray(y.T) if transpose else y
    n = len(y)
    if (angles is None) == (arc_deg is None):
        raise DataError(f"{path}: give the projection angles (angles=) or the arc they cover evenly (arc_deg=)")
    th = np.deg2rad(np.arange(n) * float(arc_deg) / n) if arc_deg is not None else \
        _angles_for(path.parent, angles, angle_units, 0, 1, n)
    meta = {"source": str(path), "arc_deg": arc_deg, "transpose": transpose}
    scan = assemble_scan(y, th, None, True, cor, cor_offset, vol_shape, None, name or path.stem, meta, two_d=True)
    return merge_repeated_angles(scan, repeated)


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


def read_tiff(path: Path) -> np.ndarray:
    """One TIFF file as float32; any reader failure is one :class:`DataError` line naming the file."""
    import tifffile  # heavy: imported only when a TIFF is read

    try:
        return np.asarray(tifffile.imread(path), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types
        raise DataError(f"{path}: unreadable TIFF ({' '.join(str(exc).split())})") from None


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
    return _natural_sorted([p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES])


def _is_field(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in ("flat", "dark", "white", "bright"))


def _natural_sorted(paths) -> list[Path]:
    def key(p: Path):
        rel = str(p)
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", rel)]
    return sorted(paths, key=key)
