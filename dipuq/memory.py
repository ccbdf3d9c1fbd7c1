"""Memory guard: estimate what a large allocation needs *before* making it, and refuse in one line.

A ray-transform matrix for a mistyped ``volume_shape`` (100000² instead of 100²) does not fail
politely: scipy's ``tocsr`` runs the machine out of memory and the process dies (SIGSEGV) or
NumPy raises ``_ArrayMemoryError`` with a traceback. :func:`require` compares an estimate with
the memory available now (``MemAvailable`` of ``/proc/meminfo``, else ``sysconf``) and raises
:class:`MemoryGuardError` naming both numbers and the config key that lowers the need.

The estimates are deliberately rough (within ~2×): they exist to catch requests that are wrong
by orders of magnitude, not to pack memory tightly. ``DIPUQ_MEMORY_LIMIT`` (bytes, or with a
``K``/``M``/``G`` suffix) caps the available figure, e.g. to test the guard or share a machine.

Example::

    >>> require(operator_bytes(geometry, "astra-cpu"), "the astra-cpu ray transform",
    ...         "reduce the volume (data.bin, data.vol_xy) or check the scan's volume_shape")
"""

from __future__ import annotations

import math
import os

from dipuq.errors import DipuqError

__all__ = ["MemoryGuardError", "available_bytes", "require", "operator_bytes", "check_operator", "volume_bytes", "fmt_bytes"]


class MemoryGuardError(DipuqError, MemoryError):
    """An allocation would need more memory than the machine has available."""


def _parse_bytes(text: str) -> int | None:
    text = text.strip().upper().removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
    try:
        return int(float(text.rstrip("KMGT")) * mult)
    except ValueError:
        return None


def available_bytes() -> int | None:
    """Memory available to a new allocation now, in bytes (None if unknown)."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            avail = None
    limit = os.environ.get("DIPUQ_MEMORY_LIMIT")
    if limit:
        cap = _parse_bytes(limit)
        if cap is not None:
            avail = cap if avail is None else min(avail, cap)
    return avail


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} KiB"


def require(nbytes: float, what: str, fix: str, *, fraction: float = 0.9) -> None:
    """Raise :class:`MemoryGuardError` if ``what`` needs more than ``fraction`` of available memory."""
    avail = available_bytes()
    if avail is None or nbytes <= fraction * avail:
        return
    raise MemoryGuardError(f"{what} would need about {fmt_bytes(nbytes)} of memory, but only {fmt_bytes(avail)} "
                           f"is available: {fix}")


def volume_bytes(geometry, copies: int = 1, itemsize: int = 4) -> float:
    """Bytes of ``copies`` volume-sized arrays."""
    return float(math.prod(geometry.vol_shape)) * copies * itemsize


def operator_bytes(geometry, backend: str) -> float:
    """Peak bytes of building a sparse ray-transform pair (A and Aᵀ) for ``geometry``.

    nnz ≈ rays × voxels touched per ray: 2 per column crossed for ASTRA's 2D linear projector
    (the 3D parallel case stores one 2D slice matrix), ~4 per voxel length for the trilinear
    cpu-cone projector (step ½, 8 neighbours, duplicates summed). Each nonzero costs scipy's
    float64 value + int32 index for A and for Aᵀ, plus the torch float32 copies (≈ 40 bytes),
    and each CSR row pointer 8 bytes (Aᵀ has one per voxel). Dense backends (astra-cuda) hold
    no matrix: their need is that of a few volumes.
    """
    vol = geometry.vol_shape
    if backend == "astra-cpu":
        n_in = max(vol[-2:])
        rays = geometry.n_angles * geometry.det_shape[-1]
        nnz = rays * 2.0 * n_in
        voxels = float(math.prod(vol[-2:]))
    elif backend == "cpu-cone":
        n_in = math.sqrt(sum(n * n for n in vol))
        rays = geometry.n_angles * math.prod(geometry.det_shape)
        nnz = rays * 4.0 * n_in
        voxels = float(math.prod(vol))
    else:
        return volume_bytes(geometry, copies=4)
    return nnz * 40.0 + (voxels + rays) * 8.0 * 2 + volume_bytes(geometry, copies=4)


def check_operator(geometry, backend: str) -> None:
    """Refuse (one line) a ray transform whose matrices or volumes cannot fit in memory."""
    require(operator_bytes(geometry, backend),
            f"the {backend} ray transform for volume {tuple(geometry.vol_shape)} and {geometry.n_angles} x "
            f"{tuple(geometry.det_shape)} projections",
            "reduce the volume (data.bin, data.vol_xy, data.angles) or check the scan's volume_shape")
