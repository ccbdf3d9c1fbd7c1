"""HDF5 loaders: Data Exchange files (tomopy / dxchange) and NeXus / NXtomo files.

Both return line integrals in a parallel-beam geometry with the centre of rotation in the
geometry (the convention of :mod:`dipuq.data.assemble`). :func:`is_data_exchange` tells which
of the two a ``.h5`` file is.

Example::

    >>> scan = load_hdf5("tomopy_tooth.h5", row=0, cor=295.575)      # Data Exchange
    >>> scan = load_nexus("k11-18014.nxs")                           # NXtomo: image_key flats/darks
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dipuq.data.assemble import assemble_scan, parallel_geometry, with_cor
from dipuq.data.preprocess import merge_repeated_angles
from dipuq.data.scan import DEFAULT_FLOOR, Scan, _average_fields, check_flat_dark, check_raw_shapes, line_integrals
from dipuq.errors import DataError
from dipuq.geometry import to_radians

__all__ = ["load_hdf5", "load_nexus", "is_data_exchange", "IMAGE_KEYS"]


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
    cor, cor_offset, vol_shape, floor : as in :func:`~dipuq.data.tiff.load_tiff_stack`
    """
    path = Path(path)
    with _open(path, "HDF5") as f:
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
        g = parallel_geometry(th, vol, (cols,))
    else:
        vol = tuple(vol_shape) if vol_shape is not None else (rows, cols, cols)
        g = parallel_geometry(th, vol, (rows, cols))
    g = with_cor(g, cor, cor_offset, y)
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
    flat/dark corrected and ``-log``-ed (:func:`~dipuq.data.scan.line_integrals`).
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
    cor, cor_offset, vol_shape, floor : as in :func:`~dipuq.data.tiff.load_tiff_stack`

    Example: ``load_nexus("k11-18014.nxs").projections.shape == (3001, 22, 26)``.
    """
    path = Path(path)
    with _open(path, "HDF5 / NeXus") as f:
        frames, keys, angles, units, src = _nx_frames(f, path, entry, data, image_key, angle_path, angles,
                                                      angle_units, row)
    n = len(keys)
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
    scan = assemble_scan(P, th, raw, row is not None, cor, cor_offset, vol_shape, floor, name or path.stem, meta)
    return merge_repeated_angles(scan, repeated)


def _nx_frames(f, path: Path, entry, data, image_key, angle_path, angles, angle_units, row):
    """``(frames, image keys, projection angles, their units, where each was found)`` of an open NeXus file.

    Frames are ``(frames, rows, cols)`` float32 (one row when ``row`` is given); the angles are
    those of the projections (image key 0), from ``angles`` or found in the file (see
    :func:`load_nexus` for where each is looked for).
    """
    tried: list[str] = []
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
    return frames, keys, angles, units, src


def _open(path: Path, what: str):
    """The HDF5 file at ``path`` open for reading; an unreadable one is a DataError naming it a ``what`` file."""
    import h5py  # heavy: imported only when an HDF5 file is read

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable {what} file ({' '.join(str(exc).split())})") from None


def is_data_exchange(path: Path) -> bool:
    """Whether an HDF5 file has ``exchange/data`` (True also when unreadable: load_hdf5 reports it)."""
    import h5py  # heavy: imported only when an HDF5 file is read

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
    import h5py  # heavy: imported only when an HDF5 file is read

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
