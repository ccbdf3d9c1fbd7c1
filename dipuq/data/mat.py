"""MATLAB loader: a tilt series or projection stack stored in a ``.mat`` file (v5–v7.2).

Example::

    >>> scan = load_mat("N6_liquid_sample_stack.mat", row=128)    # LiquidET's stack.data, one slice
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dipuq.data.assemble import assemble_scan
from dipuq.data.preprocess import merge_repeated_angles
from dipuq.data.scan import Scan
from dipuq.errors import DataError
from dipuq.geometry import to_radians

__all__ = ["load_mat"]


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
    cor, cor_offset, vol_shape : as in :func:`~dipuq.data.tiff.load_tiff_stack`

    A ``pix_sz`` field, if present, goes to ``meta["pixel_size"]`` (the geometry stays in pixels).
    """
    import scipy.io  # heavy: imported only when a .mat file is read

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
    scan = assemble_scan(y, th, None, row is not None, cor, cor_offset, vol_shape, None, name or path.stem, meta,
                         two_d=row is not None)
    return merge_repeated_angles(scan, repeated)
