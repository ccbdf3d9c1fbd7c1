"""Scans and data: the :class:`Scan` container, loaders, preprocessing, phantoms, dataset registry.

A :class:`Scan` holds line-integral projections ``y`` and the geometry of ``A`` (``y ≈ A x``).
Scans come from files (:func:`load_scan`: NPZ, TIFF stacks and sinograms, HDF5 Data Exchange,
NeXus/NXtomo, MATLAB), from the
registry of real measurements (:func:`open_dataset`, :func:`fetch`), or from simulation
(:func:`dipuq.operators.simulate_scan` of :func:`shepp_logan` / :func:`random_ellipsoids`), and are
reshaped by
:func:`merge_repeated_angles`, :func:`remove_stripes`, :func:`subsample_angles`, :func:`crop`,
:func:`bin` and :meth:`Scan.slice`.

Example::

    >>> from dipuq.data import open_dataset, subsample_angles
    >>> full = open_dataset("tooth")             # (181, 640) line integrals, CoR in the geometry
    >>> sparse = subsample_angles(full, 30)      # 30 evenly spaced angles
"""

from dipuq.data.hdf5 import load_hdf5, load_nexus
from dipuq.data.loaders import load_npz, load_scan, open_dataset
from dipuq.data.mat import load_mat
from dipuq.data.phantoms import ellipsoids, random_ellipsoids, shepp_logan
from dipuq.data.preprocess import bin, crop, estimate_cor, merge_repeated_angles, remove_stripes, subsample_angles
from dipuq.data.registry import DATASETS, Dataset, fetch
from dipuq.data.scan import Scan, line_integrals
from dipuq.data.tiff import load_sinogram, load_tiff_stack, read_angles

__all__ = [
    "Scan", "load_scan", "load_npz", "load_tiff_stack", "load_hdf5", "load_nexus", "load_sinogram", "load_mat",
    "read_angles", "line_integrals", "estimate_cor", "subsample_angles", "crop", "bin", "merge_repeated_angles",
    "remove_stripes",
    "shepp_logan", "random_ellipsoids", "ellipsoids",
    "DATASETS", "Dataset", "fetch", "open_dataset",
]
