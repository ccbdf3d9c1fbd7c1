"""The ASTRA Toolbox bridge: the only module in dipuq that imports ``astra``.

Two very different halves live here:

- **CPU, 2D** (always safe): ASTRA's CPU projectors for 2D parallel (``linear``, Joseph's
  interpolation kernel, the same kernel family as ASTRA's GPU projector and dipuq's own
  ``cpu-cone`` trilinear projector) and 2D fan (``line_fanflat``, the only fan-beam CPU kernel
  that accepts vector geometries), turned into scipy CSR matrices; plus direct FP/BP calls used as
  oracles in tests and benchmarks.
- **CUDA, 2D and 3D**: ASTRA 2.5's direct calls on DLPack tensors (torch CUDA tensors stay on the
  GPU). On a machine without a CUDA device *any* ASTRA 3D or CUDA call kills the process with
  SIGFPE, so every function of that half starts with :func:`require_cuda`.

Coordinates. dipuq follows ASTRA's 3D convention (every axis increases with its array index).
ASTRA 2D stores image row ``j`` at ``y = -(j - (ny-1)/2)``: its y axis points the other way. The
2D bridge therefore hands ASTRA the *mirror image* of the geometry, all y components of the
vectors negated; the array then lines up with dipuq's (checked by a single-pixel test in
``tests/test_operators.py``). The 3D bridge passes vectors unchanged, and a 2D geometry on the
GPU is the one-slice 3D geometry with ``v = (0, 0, voxel_size)`` — no flip there. For users the
consequence is that an image reconstructed by ASTRA's own 2D algorithms is the up–down mirror of
dipuq's (``dipuq.geometry.from_astra_orientation``; docs/scan-format.md, README, and
``tests/test_orientation.py``).

ASTRA's 3D projection arrays are ``(rows, angles, cols)``; dipuq's are ``(angles, rows, cols)``.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import scipy.sparse as sp
import torch

from dipuq.errors import DipuqError, GPUUnavailableError

__all__ = [
    "cuda_available",
    "require_cuda",
    "astra_version",
    "matrix2d",
    "fp2d",
    "bp2d",
    "CudaProjector3D",
    "fdk_cuda",
    "gpu_info",
]

log = logging.getLogger("dipuq.operators")


def _lib():
    """The astra module (imported on first use), or a clear DipuqError if it is missing."""
    try:  # imported on first use: a process that never projects never loads ASTRA (or its CUDA)
        import astra
        import astra.experimental  # noqa: F401  (direct FP/BP calls)
    except Exception as exc:  # pragma: no cover - astra is a hard dependency
        raise DipuqError(f"the ASTRA Toolbox is not importable ({exc}); install astra-toolbox") from exc
    return astra


def astra_version() -> str:
    return str(getattr(_lib(), "__version__", "unknown"))


@functools.cache
def cuda_available() -> bool:
    """True iff torch sees a CUDA device *and* ASTRA was built with CUDA and finds a GPU.

    Never raises; the answer is cached for the life of the process.
    """
    try:
        if not torch.cuda.is_available():
            return False
        return bool(_lib().use_cuda())
    except Exception:  # noqa: BLE001 - a probe must never crash
        return False


def require_cuda(what: str = "ASTRA CUDA") -> None:
    """Raise GPUUnavailableError unless :func:`cuda_available`; call before any 3D/CUDA ASTRA call."""
    if not cuda_available():
        raise GPUUnavailableError(
            f"{what} needs a CUDA GPU with ASTRA's CUDA backend, and none is available here; "
            "use backend='auto', 'astra-cpu' or 'cpu-cone'"
        )


def gpu_info(index: int = 0) -> str:
    """ASTRA's own description of CUDA device ``index`` (name, memory); needs :func:`cuda_available`."""
    require_cuda("ASTRA GPU info")
    try:
        return str(_lib().get_gpu_info(int(index)))
    except Exception as exc:  # noqa: BLE001 - an informational probe
        return f"unavailable ({type(exc).__name__}: {exc})"


# ---------------------------------------------------------------------------------------
# 2D CPU
# ---------------------------------------------------------------------------------------
def _geoms2d(beam: str, vol_shape, voxel_size: float, n_cols: int, vectors: np.ndarray):
    """ASTRA 2D (vol_geom, proj_geom, projector type) for a dipuq 2D vector geometry."""
    astra = _lib()
    ny, nx = vol_shape
    hx, hy = nx * voxel_size / 2, ny * voxel_size / 2
    vol_geom = astra.create_vol_geom(ny, nx, -hx, hx, -hy, hy)
    vec = np.array(vectors, dtype=np.float64, copy=True)
    vec[:, [1, 3, 5]] *= -1.0  # ASTRA 2D's y axis points opposite to dipuq's (module docs)
    if beam == "parallel":
        return vol_geom, astra.create_proj_geom("parallel_vec", n_cols, vec), "linear"
    if beam == "fan":
        return vol_geom, astra.create_proj_geom("fanflat_vec", n_cols, vec), "line_fanflat"
    raise DipuqError(f"ASTRA's CPU projectors handle 2D parallel and fan beams, not {beam!r}")


class _Projector2D:
    """An ASTRA 2D CPU projector, deleted with the object."""

    def __init__(self, beam, vol_shape, voxel_size, n_cols, vectors):
        self._astra = _lib()
        vg, pg, kind = _geoms2d(beam, vol_shape, voxel_size, n_cols, vectors)
        self.id = self._astra.create_projector(kind, pg, vg)
        self.kind = kind

    def __del__(self):
        try:
            self._astra.projector.delete(self.id)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@functools.lru_cache(maxsize=8)
def _matrix2d_cached(beam, vol_shape, voxel_size, n_cols, vec_bytes, n_views):
    astra = _lib()
    vectors = np.frombuffer(vec_bytes, dtype=np.float64).reshape(n_views, 6)
    proj = _Projector2D(beam, vol_shape, voxel_size, n_cols, vectors)
    mid = astra.projector.matrix(proj.id)
    try:
        M = astra.matrix.get(mid)
    finally:
        astra.matrix.delete(mid)
    M = sp.csr_matrix(M)
    M.eliminate_zeros()
    M.sort_indices()
    return M


def matrix2d(beam: str, vol_shape, voxel_size: float, n_cols: int, vectors: np.ndarray):
    """The ASTRA 2D CPU projection matrix (scipy CSR, float64), cached in-process.

    Rows are ordered ``(angle, col)``, columns ``(y, x)`` in dipuq's orientation.
    Shape ``(n_angles * n_cols, ny * nx)``.
    """
    vec = np.ascontiguousarray(vectors, dtype=np.float64)
    return _matrix2d_cached(beam, tuple(int(n) for n in vol_shape), float(voxel_size), int(n_cols),
                            vec.tobytes(), len(vec))


def fp2d(beam, vol_shape, voxel_size, n_cols, vectors, image: np.ndarray, projector=None) -> np.ndarray:
    """One forward projection by a direct ASTRA 2D CPU call. image (ny, nx) -> (angles, cols)."""
    astra = _lib()
    proj = projector or _Projector2D(beam, vol_shape, voxel_size, n_cols, vectors)
    out = np.zeros((len(vectors), n_cols), dtype=np.float32)
    astra.experimental.direct_FP2D(proj.id, np.ascontiguousarray(image, dtype=np.float32), out)
    return out


def bp2d(beam, vol_shape, voxel_size, n_cols, vectors, sino: np.ndarray, projector=None) -> np.ndarray:
    """One back-projection by a direct ASTRA 2D CPU call. sino (angles, cols) -> (ny, nx)."""
    astra = _lib()
    proj = projector or _Projector2D(beam, vol_shape, voxel_size, n_cols, vectors)
    out = np.zeros(tuple(vol_shape), dtype=np.float32)
    astra.experimental.direct_BP2D(proj.id, out, np.ascontiguousarray(sino, dtype=np.float32))
    return out


def projector2d(beam, vol_shape, voxel_size, n_cols, vectors) -> _Projector2D:
    """A reusable ASTRA 2D CPU projector handle for :func:`fp2d` / :func:`bp2d`."""
    return _Projector2D(beam, vol_shape, voxel_size, n_cols, vectors)


def create_sino2d(projector: _Projector2D, image: np.ndarray) -> np.ndarray:
    """ASTRA's high-level ``create_sino`` (data objects + FP algorithm), for cross-checks."""
    astra = _lib()
    sid, sino = astra.create_sino(np.ascontiguousarray(image, dtype=np.float32), projector.id)
    astra.data2d.delete(sid)
    return sino


def create_backprojection2d(projector: _Projector2D, sino: np.ndarray) -> np.ndarray:
    """ASTRA's high-level ``create_backprojection``, for cross-checks."""
    astra = _lib()
    bid, bp = astra.create_backprojection(np.ascontiguousarray(sino, dtype=np.float32), projector.id)
    astra.data2d.delete(bid)
    return bp


# ---------------------------------------------------------------------------------------
# 3D / CUDA (guarded)
# ---------------------------------------------------------------------------------------
def _geoms3d(beam: str, vol_shape, voxel_size: float, det_shape, vectors: np.ndarray):
    astra = _lib()
    nz, ny, nx = vol_shape
    hx, hy, hz = nx * voxel_size / 2, ny * voxel_size / 2, nz * voxel_size / 2
    vol_geom = astra.create_vol_geom(ny, nx, nz, -hx, hx, -hy, hy, -hz, hz)
    rows, cols = det_shape
    kind = {"cone": "cone_vec", "parallel": "parallel3d_vec"}[beam]
    proj_geom = astra.create_proj_geom(kind, int(rows), int(cols), np.ascontiguousarray(vectors, dtype=np.float64))
    return vol_geom, proj_geom


class CudaProjector3D:
    """An ASTRA ``cuda3d`` projector with direct FP/BP on DLPack tensors (no host round trip).

    ``beam`` is "parallel" or "cone", ``vectors`` dipuq/ASTRA 3D vectors ``(n_angles, 12)``.
    :meth:`fp` writes ``(rows, angles, cols)`` projections into ``out``; :meth:`bp` writes the
    ``(z, y, x)`` volume. Both overwrite ``out`` (ASTRA's ``direct_*`` calls do not accumulate).
    """

    def __init__(self, beam, vol_shape, voxel_size, det_shape, vectors, gpu_index: int = 0):
        require_cuda()
        astra = _lib()
        self._astra = astra
        if gpu_index:
            astra.set_gpu_index(int(gpu_index))
        self.vol_geom, self.proj_geom = _geoms3d(beam, vol_shape, voxel_size, det_shape, vectors)
        self.id = astra.create_projector("cuda3d", self.proj_geom, self.vol_geom)

    def fp(self, vol, out):
        """out (rows, angles, cols) = A vol; both contiguous float32 (CPU or CUDA tensors)."""
        self._astra.experimental.direct_FP3D(self.id, vol, out)
        return out

    def bp(self, proj, out):
        """out (z, y, x) = ASTRA's back-projection of proj (rows, angles, cols)."""
        self._astra.experimental.direct_BP3D(self.id, out, proj)
        return out

    def __del__(self):
        try:
            self._astra.projector3d.delete(self.id)
        except Exception:  # noqa: BLE001
            pass


def fdk_cuda(vol_shape, voxel_size, det_shape, vectors, proj_rac: np.ndarray) -> np.ndarray:
    """ASTRA's FDK_CUDA on host arrays: proj (rows, angles, cols) -> volume (z, y, x).

    A one-off reconstruction, so the host round trip does not matter here.
    """
    require_cuda("ASTRA FDK_CUDA")
    astra = _lib()
    vg, pg = _geoms3d("cone", vol_shape, voxel_size, det_shape, vectors)
    pid = astra.data3d.create("-sino", pg, np.ascontiguousarray(proj_rac, dtype=np.float32))
    rid = astra.data3d.create("-vol", vg, 0.0)
    cfg = astra.astra_dict("FDK_CUDA")
    cfg["ProjectionDataId"], cfg["ReconstructionDataId"] = pid, rid
    aid = astra.algorithm.create(cfg)
    try:
        astra.algorithm.run(aid)
        return astra.data3d.get(rid)
    finally:
        astra.algorithm.delete(aid)
        astra.data3d.delete([pid, rid])
