"""Loaders: NPZ scan files, TIFF stacks and sinograms, HDF5 Data Exchange, NeXus/NXtomo, MATLAB → :class:`Scan`.

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
    >>> scan = load_scan("k11-18014.nxs")                             # NXtomo: image_key flats/darks
    >>> scan = load_scan("woodsino_0200.tif", arc_deg=360)            # one sinogram image
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

__all__ = ["load_scan", "load_npz", "load_tiff_stack", "load_hdf5", "load_nexus", "load_sinogram", "load_mat",
           "read_angles"]

_TIFF = (".tif", ".tiff")


def load_scan(source: str | os.PathLike, **opts) -> Scan:
    """Load a scan from an ``.npz`` file, a TIFF-stack folder, a TIFF sinogram, an HDF5 / NeXus file,
    a MATLAB ``.mat`` file or a registry name.

    ``opts`` go to the matching loader (:func:`load_npz`, :func:`load_tiff_stack`,
    :func:`load_sinogram`, :func:`load_hdf5` for Data Exchange files, :func:`load_nexus` for
    ``.nxs`` files and HDF5 files without ``exchange/data``, :func:`load_mat`,
    :func:`dipuq.data.registry.open_dataset`).
    """
    path = Path(source)
    if path.exists():
        if path.is_dir():
            return load_tiff_stack(path, **opts)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return load_npz(path, **opts)
        if suffix in _TIFF:
            return load_sinogram(path, **opts)
        if suffix == ".mat":
            return load_mat(path, **opts)
        if suffix in (".h5", ".hdf5", ".hdf", ".nxs", ".cxi"):
            return load_hdf5(path, **opts) if _is_data_exchange(path) else load_nexus(path, **opts)
        raise DataError(f"{path}: unknown scan file type {suffix!r} "
                        "(use .npz, .tif, .h5/.hdf5/.nxs, .mat or a TIFF folder)")
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
        im = _read_tiff(f)
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


#: NXtomo (NeXus application definition for tomography) ``image_key`` values.
IMAGE_KEYS = {"projection": 0, "flat": 1, "dark": 2, "invalid": 3}

#: Where NXtomo files keep their frames, image keys and rotation angles (``*`` = any NXentry),
#: tried in this order before the file's own NXdata / NXdetector groups are searched.
_NX_DATA = ("{e}/instrument/detector/data", "{e}/data/data")
_NX_KEY = ("{e}/instrument/detector/image_key", "{e}/data/image_key")
_NX_ANGLE = ("{e}/sample/rotation_angle", "{e}/data/rotation_angle")


def load_nexus(path: str | os.PathLike, *, entry: str | None = None, data: str | None = None,
               image_key: str | None = None, angle_path: str | None = None, angles=None,
               angle_units: str | None = None, row: int | None = None, repeated: str = "mean",
               cor: float | str | None = None, cor_offset: float = 0.0, vol_shape: tuple[int, ...] | None = None,
               floor: float = DEFAULT_FLOOR, name: str | None = None) -> Scan:
    """A parallel-beam scan from a NeXus / NXtomo file: frames split by ``image_key``, angles from the file.

    Frames ``(frames, rows, cols)`` with ``image_key`` 0 are projections, 1 flat (open-beam) and
    2 dark fields (3 = invalid, dropped); flats and darks are averaged and the projections
    flat/dark corrected and ``-log``-ed (:func:`~dipuq.data.preprocess.line_integrals`).
    External links (frames or angles in other files beside the ``.nxs``) are followed; broken
    ones are skipped with the reason in the error if nothing else is found.

    Where things are looked for (the first that exists and has one value per frame wins):

    - frames: ``data=``, else NXtomo ``/entry/instrument/detector/data`` or ``/entry/data/data``,
      else the ``signal`` of the entry's NXdata groups (its ``default`` first), else a 3D
      ``data`` in an NXdetector group;
    - image keys: ``image_key=``, else NXtomo ``…/detector/image_key`` / ``/entry/data/image_key``,
      else an ``image_key`` beside the frames or in any NXdetector group; none → all projections;
    - angles: ``angles=`` (array) or ``angle_path=``, else NXtomo ``/entry/sample/rotation_angle``
      or ``/entry/data/rotation_angle``, else the NXdata group's ``axes`` and any dataset named
      like ``*theta*`` / ``*angle*`` / ``*rotation*`` in it, else ``value`` of an NXpositioner
      named so (Diamond's ``gts_theta``). Units: the dataset's ``units`` attribute, else
      ``angle_units``, else degrees.

    Parameters
    ----------
    entry : the NXentry to read (default: the first ``NXentry``, else ``entry``)
    data, image_key, angle_path : paths in the file that override the search
    angles : angles (in ``angle_units``, default degrees), one per projection or one per frame
    row : one detector row → a 2D scan of that slice (read from the file row-wise); None → 3D
    repeated : ``"mean"`` (merge frames of one angle by averaging) or ``"keep"``; see
        :func:`~dipuq.data.preprocess.merge_repeated_angles`
    cor, cor_offset, vol_shape, floor : as in :func:`load_tiff_stack`

    Example: ``load_nexus("k11-18014.nxs").projections.shape == (3001, 22, 26)``.
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 / NeXus file ({' '.join(str(exc).split())})") from None
    tried: list[str] = []
    with f:
        e = entry or _nx_entry(f)
        if e not in f:
            raise DataError(f"{path}: no NeXus entry {e!r}")
        dpath = data or _nx_find(f, [p.format(e=e) for p in _NX_DATA] + _nx_signals(f, e), None, tried, ndim=3)
        if dpath is None:
            raise DataError(f"{path}: no 3D frame stack found (tried {', '.join(tried) or 'nothing'}); pass data=")
        ds = _nx_get(f, dpath, tried)
        if ds is None or ds.ndim != 3:
            raise DataError(f"{path}: {dpath} must be a (frames, rows, cols) dataset")
        n = ds.shape[0]
        parent = dpath.rsplit("/", 1)[0]
        kpath = image_key or _nx_find(
            f, [p.format(e=e) for p in _NX_KEY] + [f"{parent}/image_key"] + _nx_detector_keys(f, e, dpath),
            n, tried)
        kds = None if kpath is None else _nx_get(f, kpath, tried)
        if kpath is not None and kds is None:
            raise DataError(f"{path}: no image_key dataset at {kpath}")
        keys = np.zeros(n, np.int64) if kds is None else np.asarray(kds[()]).astype(np.int64).reshape(-1)
        if len(keys) != n:
            raise DataError(f"{path}: {kpath} has {len(keys)} values for {n} frames")
        unknown = sorted(set(np.unique(keys).tolist()) - set(IMAGE_KEYS.values()))
        if unknown:
            raise DataError(f"{path}: image_key values {unknown} are not NXtomo's 0 (projection), 1 (flat), 2 (dark), 3 (invalid)")
        units, apath = angle_units, None
        if angles is None:
            apath = angle_path or _nx_find(f, [p.format(e=e) for p in _NX_ANGLE] + _nx_angle_candidates(f, e, parent),
                                           n, tried)
            if apath is None:
                raise DataError(f"{path}: no rotation angles with one value per frame (tried {', '.join(tried)}); "
                                "pass angles= or angle_path=")
            a = _nx_get(f, apath, tried)
            angles = np.asarray(a[()], dtype=np.float64).reshape(-1)
            if units is None:
                units = _nx_units(a)
            if len(angles) != n:
                raise DataError(f"{path}: {apath} has {len(angles)} angles for {n} frames")
            angles = angles[keys == 0]
        elif np.size(angles) == n and n != int(np.sum(keys == 0)):
            angles = np.asarray(angles, dtype=np.float64).reshape(-1)[keys == 0]  # one per frame given
        src = dict(data=dpath, image_key=kpath, angles=apath)
        sel = (slice(None), slice(row % ds.shape[1], row % ds.shape[1] + 1)) if row is not None else (slice(None),)
        if row is not None and not -ds.shape[1] <= row < ds.shape[1]:
            raise DataError(f"row {row} is outside the detector's {ds.shape[1]} rows")
        try:
            frames = np.asarray(ds[sel], dtype=np.float32)  # shape: (frames, rows, cols)
        except (OSError, KeyError) as exc:
            raise DataError(f"{path}: cannot read {dpath} ({' '.join(str(exc).split())})") from None
    try:
        th = to_radians(angles, units or "deg")
    except ValueError as exc:
        raise DataError(str(exc)) from None
    P = frames[keys == 0]
    counts = {k: int(np.sum(keys == v)) for k, v in IMAGE_KEYS.items()}
    if len(P) == 0:
        raise DataError(f"{path}: no projections (image_key 0) among {n} frames")
    if len(th) != len(P):
        raise DataError(f"angle count mismatch: {len(th)} angles for {len(P)} projections in {path}")
    raw = None
    if counts["flat"] or counts["dark"]:
        if not (counts["flat"] and counts["dark"]):
            raise DataError(f"{path}: {counts['flat']} flat and {counts['dark']} dark frames: need both or neither")
        raw = (P, frames[keys == 1].mean(axis=0, dtype=np.float64).astype(np.float32),
               frames[keys == 2].mean(axis=0, dtype=np.float64).astype(np.float32))
    meta = {"source": str(path), "floor": floor, "row": row, "image_key_counts": counts, "nexus": src}
    scan = _scan_from(P, th, raw, row is not None, cor, cor_offset, vol_shape, floor, name or path.stem, meta)
    return _merge(scan, repeated)


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
    y = _read_tiff(path)
    if y.ndim != 2:
        raise DataError(f"{path}: a sinogram image is 2D (angles, cols), got shape {y.shape}")
    y = np.ascontiguousarray(y.T) if transpose else y
    n = len(y)
    if (angles is None) == (arc_deg is None):
        raise DataError(f"{path}: give the projection angles (angles=) or the arc they cover evenly (arc_deg=)")
    th = np.deg2rad(np.arange(n) * float(arc_deg) / n) if arc_deg is not None else \
        _angles_for(path.parent, angles, angle_units, 0, 1, n)
    meta = {"source": str(path), "arc_deg": arc_deg, "transpose": transpose}
    scan = _scan_from(y, th, None, True, cor, cor_offset, vol_shape, None, name or path.stem, meta, two_d=True)
    return _merge(scan, repeated)


def load_mat(path: str | os.PathLike, *, struct: str | None = "stack", data: str = "data", angles: str | np.ndarray = "angles",
             angle_units: str = "deg", axes: str = "rows,cols,angles", row: int | None = None,
             repeated: str = "mean", cor: float | str | None = None, cor_offset: float = 0.0,
             vol_shape: tuple[int, ...] | None = None, name: str | None = None) -> Scan:
    """A parallel-beam scan from a MATLAB ``.mat`` file (v5–v7.2, read by ``scipy.io.loadmat``).

    The projections are taken as line integrals already (electron tomography: HAADF-STEM
    intensity is ≈ proportional to projected mass, so no ``-log``).

    Parameters
    ----------
    struct : the struct variable holding ``data`` and ``angles`` (None: they are top-level variables)
    data, angles : field names (``angles`` may also be an array in ``angle_units``)
    axes : what the three axes of ``data`` are, a permutation of ``rows,cols,angles`` (rows run
        along the tilt/rotation axis: each row is one slice's sinogram). LiquidET's
        ``stack.data`` is ``(rows, cols, angles)``, the default.
    row : one detector row → a 2D scan; None → 3D ``(angles, rows, cols)``
    repeated : ``"mean"`` (average the frames of one tilt, default) or ``"keep"``; see
        :func:`~dipuq.data.preprocess.merge_repeated_angles`
    cor, cor_offset, vol_shape : as in :func:`load_tiff_stack`

    A ``pix_sz`` field, if present, goes to ``meta["pixel_size"]`` (the geometry stays in pixels).
    """
    import scipy.io

    path = Path(path)
    try:
        m = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types (and v7.3 files are HDF5)
        raise DataError(f"{path}: not a readable MATLAB v5 file ({' '.join(str(exc).split())}); "
                        "v7.3 files are HDF5: load them with h5py") from None
    variables = [k for k in m if not k.startswith("__")]
    if struct is not None:
        if struct not in m:
            raise DataError(f"{path}: no variable {struct!r} (has {', '.join(variables)})")
        obj = m[struct]
        get = lambda k: getattr(obj, k, None)  # noqa: E731
        fields = list(getattr(obj, "_fieldnames", []))
    else:
        get, fields = m.get, variables
    arr = get(data)
    if arr is None:
        raise DataError(f"{path}: no field {data!r} (has {', '.join(fields)})")
    arr = np.asarray(arr)
    order = [a.strip() for a in axes.split(",")]
    if sorted(order) != ["angles", "cols", "rows"] or arr.ndim != 3:
        raise DataError(f"{path}: {data} has shape {arr.shape}; axes={axes!r} must name rows, cols, angles once each")
    y = np.ascontiguousarray(np.transpose(arr, [order.index(k) for k in ("angles", "rows", "cols")]), dtype=np.float32)
    if isinstance(angles, str):
        a = get(angles)
        if a is None:
            raise DataError(f"{path}: no field {angles!r} (has {', '.join(fields)}); pass angles= as an array")
    else:
        a = angles
    try:
        th = to_radians(np.asarray(a, dtype=np.float64), angle_units)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if len(th) != len(y):
        raise DataError(f"angle count mismatch: {len(th)} angles for {len(y)} projections in {path}")
    if row is not None:
        if not -y.shape[1] <= row < y.shape[1]:
            raise DataError(f"row {row} is outside the detector's {y.shape[1]} rows")
        y = np.ascontiguousarray(y[:, row])
    meta = {"source": str(path), "row": row, "axes": axes}
    px = get("pix_sz")
    if px is not None:
        meta["pixel_size"] = float(np.asarray(px).reshape(-1)[0])
    scan = _scan_from(y, th, None, row is not None, cor, cor_offset, vol_shape, None, name or path.stem, meta,
                      two_d=row is not None)
    return _merge(scan, repeated)


# -- NeXus helpers ---------------------------------------------------------------------------
def _read_tiff(path: Path) -> np.ndarray:
    """One TIFF file as float32; any reader failure is one :class:`DataError` line naming the file."""
    import tifffile

    try:
        return np.asarray(tifffile.imread(path), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types
        raise DataError(f"{path}: unreadable TIFF ({' '.join(str(exc).split())})") from None


def _is_data_exchange(path: Path) -> bool:
    """Whether an HDF5 file has ``exchange/data`` (True also when unreadable: load_hdf5 reports it)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "exchange/data" in f
    except OSError:
        return True


def _nx_class(obj) -> str:
    c = obj.attrs.get("NX_class", b"")
    return c.decode() if isinstance(c, bytes) else str(c)


def _nx_entry(f) -> str:
    for k in f:
        try:
            if _nx_class(f[k]) == "NXentry":
                return k
        except (KeyError, OSError):
            continue
    return "entry"


def _nx_get(f, p: str, tried: list[str]):
    """``f[p]`` or None when missing or behind a broken (external) link; records why in ``tried``."""
    import h5py

    try:
        return f[p]
    except (KeyError, OSError):
        parent, name = p.rsplit("/", 1) if "/" in p else ("/", p)
        try:
            link = f[parent].get(name, getlink=True)
        except (KeyError, OSError):
            link = None
        if isinstance(link, h5py.ExternalLink):
            tried.append(f"{p} (link to a missing file {link.filename})")
        return None


def _nx_find(f, candidates, n: int | None, tried: list[str], ndim: int | None = None) -> str | None:
    """The first candidate path that is a dataset (of ``n`` values along axis 0, or ``ndim`` dims)."""
    seen = set()
    for p in candidates:
        if p in seen:
            continue
        seen.add(p)
        obj = _nx_get(f, p, tried)
        if obj is None or not hasattr(obj, "shape"):
            continue
        if ndim is not None and obj.ndim != ndim:
            continue
        if n is not None and (obj.ndim < 1 or obj.shape[0] != n):
            tried.append(f"{p} ({obj.shape[0] if obj.ndim else 'scalar'} values, not {n})")
            continue
        return p
    return None


def _nx_groups(f, e: str, cls: str) -> list[str]:
    out = []
    def visit(name, obj):  # visititems does not follow links: groups here are local
        if hasattr(obj, "keys") and _nx_class(obj) == cls:
            out.append(f"{e}/{name}")
    f[e].visititems(visit)
    return out


def _nx_signals(f, e: str) -> list[str]:
    """The ``signal`` datasets of the entry's NXdata groups (the ``default`` one first), and NXdetector ``data``."""
    groups = _nx_groups(f, e, "NXdata")
    default = f[e].attrs.get("default")
    if default is not None:
        default = f"{e}/{default.decode() if isinstance(default, bytes) else default}"
        groups = [default] + [g for g in groups if g != default]
    out = []
    for g in groups:
        if g in f:
            sig = f[g].attrs.get("signal", "data")
            out.append(f"{g}/{sig.decode() if isinstance(sig, bytes) else sig}")
    return out + [f"{g}/data" for g in _nx_groups(f, e, "NXdetector")]


def _nx_link(f, p: str):
    """(file, path) an external link at ``p`` points to, or ``p`` itself."""
    parent, name = p.rsplit("/", 1) if "/" in p else ("/", p)
    try:
        link = f[parent].get(name, getlink=True)
    except (KeyError, OSError):
        return p
    return (link.filename, link.path) if hasattr(link, "filename") else (getattr(link, "path", p),)


def _nx_detector_keys(f, e: str, dpath: str) -> list[str]:
    """``image_key`` of the entry's NXdetector groups, the one whose ``data`` is the frames' first."""
    target = _nx_link(f, dpath)
    groups = _nx_groups(f, e, "NXdetector")
    same = [g for g in groups if _nx_link(f, f"{g}/data") == target]
    return [f"{g}/image_key" for g in same + [g for g in groups if g not in same]]


def _nx_angle_candidates(f, e: str, data_group: str) -> list[str]:
    like = ("theta", "angle", "rotation")
    out = []
    g = f.get(data_group)
    if g is not None and hasattr(g, "attrs"):
        axes = g.attrs.get("axes")
        if axes is not None:
            axes = [a.decode() if isinstance(a, bytes) else str(a) for a in np.atleast_1d(axes)]
            if axes and axes[0] != ".":
                out.append(f"{data_group}/{axes[0]}")
        out += [f"{data_group}/{k}" for k in g.keys() if any(w in k.lower() for w in like)]
    out += [f"{p}/value" for p in _nx_groups(f, e, "NXpositioner") if any(w in p.rsplit("/", 1)[-1].lower() for w in like)]
    return out


def _nx_units(ds) -> str | None:
    u = ds.attrs.get("units")
    if u is None:
        return None
    u = (u.decode() if isinstance(u, bytes) else str(u)).strip().lower()
    return {"deg": "deg", "degree": "deg", "degrees": "deg", "rad": "rad", "radian": "rad", "radians": "rad"}.get(u)


# -- shared by the loaders above -------------------------------------------------------------
def _scan_from(y, th, raw, single_row, cor, cor_offset, vol_shape, floor, name, meta, two_d=False) -> Scan:
    """A parallel-beam Scan from projections ``(angles, rows, cols)`` (or ``(angles, cols)`` when
    ``two_d``), optional raw ``(counts, flat, dark)``; ``single_row`` squeezes a one-row detector to 2D."""
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
        g = _geometry("parallel", th, vol, (cols,))
    else:
        rows, cols = y.shape[1:]
        vol = tuple(vol_shape) if vol_shape is not None else (rows, cols, cols)
        g = _geometry("parallel", th, vol, (rows, cols))
    g = _with_cor(g, cor, cor_offset, y)
    return Scan(y, g, name=name, meta=meta, **kw)


def _merge(scan: Scan, repeated: str) -> Scan:
    from dipuq.data.preprocess import merge_repeated_angles

    return merge_repeated_angles(scan, repeated)


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
