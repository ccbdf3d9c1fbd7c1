"""Scans by path or name: :func:`load_scan` picks the loader for a file, folder or registered dataset.

=====================  ==================================================  =====================
source                 loader                                              module
=====================  ==================================================  =====================
``.npz`` scan file     :func:`load_npz` (= :meth:`Scan.load`)               :mod:`dipuq.data.scan`
folder of TIFFs        :func:`~dipuq.data.tiff.load_tiff_stack`            :mod:`dipuq.data.tiff`
one TIFF sinogram      :func:`~dipuq.data.tiff.load_sinogram`              :mod:`dipuq.data.tiff`
HDF5 Data Exchange     :func:`~dipuq.data.hdf5.load_hdf5`                  :mod:`dipuq.data.hdf5`
NeXus / NXtomo         :func:`~dipuq.data.hdf5.load_nexus`                 :mod:`dipuq.data.hdf5`
MATLAB ``.mat``        :func:`~dipuq.data.mat.load_mat`                    :mod:`dipuq.data.mat`
dataset name           :func:`open_dataset` (fetched, SHA-256 verified)    :mod:`dipuq.data.registry`
=====================  ==================================================  =====================

Every loader returns line integrals in a parallel-beam geometry with the centre of rotation in
the geometry (the convention of :mod:`dipuq.data.assemble`).

Example::

    >>> scan = load_scan("savu_24737", angle_start=10, cor="auto")   # a TIFF folder
    >>> scan = load_scan("tooth")                                     # a registry name
    >>> scan = load_scan("k11-18014.nxs")                             # NXtomo: image_key flats/darks
    >>> scan = load_scan("woodsino_0200.tif", arc_deg=360)            # one sinogram image
"""

from __future__ import annotations

import os
from pathlib import Path

from dipuq.data.hdf5 import is_data_exchange, load_hdf5, load_nexus
from dipuq.data.mat import load_mat
from dipuq.data.registry import DATASETS, fetch, get
from dipuq.data.scan import Scan
from dipuq.data.tiff import TIFF_SUFFIXES, load_sinogram, load_tiff_stack
from dipuq.errors import DataError

__all__ = ["load_scan", "load_npz", "open_dataset"]


def load_scan(source: str | os.PathLike, **opts) -> Scan:
    """Load a scan from an ``.npz`` file, a TIFF-stack folder, a TIFF sinogram, an HDF5 / NeXus file,
    a MATLAB ``.mat`` file or a registry name.

    ``opts`` go to the matching loader (:func:`load_npz`, :func:`load_tiff_stack`,
    :func:`load_sinogram`, :func:`load_hdf5` for Data Exchange files, :func:`load_nexus` for
    ``.nxs`` files and HDF5 files without ``exchange/data``, :func:`load_mat`,
    :func:`open_dataset`).
    """
    path = Path(source)
    if path.exists():
        if path.is_dir():
            return load_tiff_stack(path, **opts)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return load_npz(path, **opts)
        if suffix in TIFF_SUFFIXES:
            return load_sinogram(path, **opts)
        if suffix == ".mat":
            return load_mat(path, **opts)
        if suffix in (".h5", ".hdf5", ".hdf", ".nxs", ".cxi"):
            return load_hdf5(path, **opts) if is_data_exchange(path) else load_nexus(path, **opts)
        raise DataError(f"{path}: unknown scan file type {suffix!r} "
                        "(use .npz, .tif, .h5/.hdf5/.nxs, .mat or a TIFF folder)")
    if str(source) in DATASETS:
        return open_dataset(str(source), **opts)
    raise DataError(f"no such scan file, folder or dataset: {source} (datasets: {', '.join(DATASETS)})")


def load_npz(path: str | os.PathLike, *, floor: float | None = None) -> Scan:
    """Read the NPZ scan format (``docs/scan-format.md``); same as :meth:`Scan.load`."""
    return Scan.load(path, floor=floor)


def open_dataset(name: str, *, mirror: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 **opts):
    """The registered scan ``name`` as a ready :class:`~dipuq.data.Scan` (line integrals, CoR in the geometry).

    ``tooth``: 2D parallel, 181 angles, (181, 640) projections, rotation axis at column 295.6.
    ``diamond-24737``: 3D parallel, 91 angles, (91, 135, 160) projections, axis at column 85.8.
    ``psi-wood``: 2D parallel, 625 angles over 360°, (625, 577) line integrals, axis at column 283.7.
    ``liquidet-n6``: 3D parallel tilt series, 46 tilts (116 frames averaged), (46, 256, 256).
    ``diamond-k11``: 3D parallel NeXus, 3001 angles, (3001, 22, 26) after the image_key split.
    ``opts`` override the registry's loader options (e.g. ``row=1`` or ``cor="auto"``).
    """
    ds = get(name)
    path = fetch(ds, cache_dir=cache_dir, mirror=mirror)
    kw = {**ds.options, **opts}
    if "cor_offset" in opts and "cor" not in opts:
        kw.pop("cor", None)  # an explicit offset replaces the registry's axis column
    kw.setdefault("name", ds.name)
    loader = {"hdf5": load_hdf5, "tiff": load_tiff_stack, "sinogram": load_sinogram, "mat": load_mat,
              "nexus": load_nexus}[ds.loader]
    scan = loader(path, **kw)
    scan.meta.update(dataset=ds.name, licence=ds.licence, source_url=ds.source)
    return scan
