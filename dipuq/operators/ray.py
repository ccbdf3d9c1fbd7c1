"""The ray transform A: volume -> line integrals, behind one factory and a backend registry.

Mathematically ``(A f)(ray) = ∫_ray f`` for every ray of a :class:`~dipuq.geometry.Geometry`,
discretised on the voxel grid; line integrals are in world length units (``voxel_size`` units).
``A(x)`` maps ``(*batch, *vol_shape)`` to ``(*batch, *proj_shape)`` and ``A.T(y)`` back; it works
in torch.autograd and torch.func (JVP = A, VJP = Aᵀ, vmap over leading dims), see
:mod:`dipuq.operators.base`.

Backends (``backend=`` key; ``available_backends()`` lists what this machine can run):

=============  ===================================================================  ============
key            what                                                                 geometries
=============  ===================================================================  ============
astra-cuda     ASTRA's GPU projectors via direct calls on CUDA tensors (no host     all
               round trip); 2D runs as one-slice 3D
astra-cpu      ASTRA's CPU projector as a cached torch sparse CSR pair (A and Aᵀ);   2D parallel,
               3D parallel = the 2D matrix on every axial slice at once             fan; 3D
                                                                                    parallel
cpu-cone       dipuq's own trilinear ray-driven projector as a CSR pair             all
=============  ===================================================================  ============

``backend="auto"`` picks astra-cuda when :func:`cuda_available`, else astra-cpu where it
applies, else cpu-cone, and logs the choice; the instance says which via ``A.backend``. The
sparse backends also run on a CUDA device (``device="cuda"``) with exactly matched adjoints.

Example::

    >>> g = Geometry.parallel2d(np.linspace(0, np.pi, 30, endpoint=False), (32, 32))
    >>> A = RayTransform(g)                      # auto: 'astra-cpu' on a CPU-only machine
    >>> y = A(torch.ones(2, 1, 32, 32))          # shape: (2, 1, 30, 47)
    >>> A.T(y).shape
    torch.Size([2, 1, 32, 32])
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch

from dipuq.devices import same_device
from dipuq.errors import DipuqError
from dipuq.geometry import Geometry, lift3d
from dipuq.memory import check_operator
from dipuq.operators import _astra
from dipuq.operators.base import AdjointOperator, LinearOperator
from dipuq.operators.cone_cpu import build_matrix

__all__ = ["RayTransform", "cuda_available", "available_backends", "BACKENDS"]

log = logging.getLogger("dipuq.operators")

cuda_available = _astra.cuda_available

#: backend key -> RayTransform subclass, in order of preference for ``auto``
BACKENDS: dict[str, type[RayTransform]] = {}


def available_backends(geometry: Geometry | None = None) -> list[str]:
    """Backend keys usable on this machine (for ``geometry``, if given), fastest first."""
    out = []
    for key, cls in sorted(BACKENDS.items(), key=lambda kv: kv[1].priority):
        if cls.requires_cuda and not cuda_available():
            continue
        if geometry is not None and cls.unsupported(geometry) is not None:
            continue
        out.append(key)
    return out


class RayTransform(LinearOperator):
    """The ray transform of a geometry; ``RayTransform(geometry, backend)`` builds the backend's subclass.

    Parameters
    ----------
    geometry : the acquisition (:class:`dipuq.geometry.Geometry`)
    backend : "auto" | "astra-cuda" | "astra-cpu" | "cpu-cone"
    device : torch device of inputs/outputs (default: "cuda" for astra-cuda, else "cpu")
    dtype : torch.float32 (all backends) or torch.float64 (sparse backends)

    Attributes: ``geometry``, ``backend`` (the key actually used), ``domain_shape = vol_shape``,
    ``range_shape = proj_shape``.
    """

    key: str = ""
    requires_cuda: bool = False
    priority: int = 100  # lower = preferred by "auto"
    geometry: Geometry
    backend: str

    def __init_subclass__(cls, key: str = "", **kw):
        super().__init_subclass__(**kw)
        if key:
            cls.key = key
            BACKENDS[key] = cls

    def __new__(cls, geometry=None, backend: str = "auto", device=None, dtype=torch.float32):
        if cls is not RayTransform:
            return super().__new__(cls)
        if not isinstance(geometry, Geometry):
            raise DipuqError(f"RayTransform needs a dipuq.geometry.Geometry, got {type(geometry).__name__}")
        if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
            raise DipuqError(f"unknown ray-transform backend {backend!r}: use 'auto' or one of {', '.join(BACKENDS)}")
        if backend == "auto":
            ok = available_backends(geometry)
            if device is not None and torch.device(device).type != "cuda":
                ok = [k for k in ok if not BACKENDS[k].requires_cuda]
            if not ok:  # pragma: no cover - cpu-cone takes every geometry
                raise DipuqError(f"no backend supports {geometry.describe()}")
            backend = ok[0]
            log.info("RayTransform: backend 'auto' chose %r for %s", backend, geometry.describe())
        sub = BACKENDS[backend]
        if sub.requires_cuda:
            _astra.require_cuda(f"backend {backend!r}")
        why = sub.unsupported(geometry)
        if why is not None:
            raise DipuqError(f"backend {backend!r} cannot project {geometry.describe()}: {why}")
        return super().__new__(sub)

    def __init__(self, geometry, backend="auto", device=None, dtype=torch.float32):
        self.geometry = geometry
        self.backend = self.key
        self.domain_shape = tuple(geometry.vol_shape)
        self.range_shape = tuple(geometry.proj_shape)
        if dtype not in (torch.float32, torch.float64):
            raise DipuqError(f"RayTransform dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device if device is not None else self.default_device())
        check_operator(geometry, self.key)  # refuse before allocating, not after the OOM killer

    # -- per-backend -------------------------------------------------------------------
    @classmethod
    def unsupported(cls, geometry: Geometry) -> str | None:
        """None if this backend can project ``geometry``, else the reason (one line)."""
        return None

    def default_device(self) -> str:
        return "cpu"

    # -- input validation with dipuq errors --------------------------------------------
    def _check(self, x, adjoint: bool) -> None:
        want = self.range_shape if adjoint else self.domain_shape
        k = len(want)
        if not isinstance(x, torch.Tensor):
            raise DipuqError(f"RayTransform expects a torch.Tensor, got {type(x).__name__}")
        if x.ndim < k or tuple(x.shape[x.ndim - k:]) != tuple(want):
            what = "Aᵀ" if adjoint else "A"
            raise DipuqError(f"{what} of {self.geometry.describe()} expects a tensor ending in shape "
                             f"{tuple(want)}, got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise DipuqError(f"RayTransform ({self.backend}) expects dtype {self.dtype}, got {x.dtype}")
        if not same_device(x.device, self.device):
            raise DipuqError(f"RayTransform ({self.backend}) lives on {self.device}, got a tensor on {x.device}; "
                             f"move it with x.to({str(self.device)!r}) (or build the operator with device={str(x.device)!r})")

    def _raw(self, x, adjoint):
        self._check(x, adjoint)
        return super()._raw(x, adjoint)

    @property
    def T(self) -> LinearOperator:
        return _RayAdjoint(self)

    def __repr__(self):
        return f"RayTransform[{self.backend}]({self.geometry.describe()}, {self.dtype}, {self.device})"


class _RayAdjoint(AdjointOperator):
    """Aᵀ of a RayTransform, validating its inputs like A does."""

    def _raw(self, x, adjoint):
        self.op._check(x, not adjoint)
        return super()._raw(x, adjoint)


# ---------------------------------------------------------------------------------------
# sparse helpers
# ---------------------------------------------------------------------------------------
def _to_torch_csr(M, dtype, device) -> torch.Tensor:
    """A scipy CSR matrix as a torch sparse CSR tensor (int32 indices when they fit)."""
    idx = torch.int32 if M.nnz < 2**31 - 1 and max(M.shape) < 2**31 - 1 else torch.int64
    crow = torch.from_numpy(np.asarray(M.indptr)).to(idx)
    col = torch.from_numpy(np.asarray(M.indices)).to(idx)
    val = torch.from_numpy(np.asarray(M.data)).to(dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        t = torch.sparse_csr_tensor(crow, col, val, size=M.shape, check_invariants=False)
        return t.to(device)


def _csr_pair(M, dtype, device):
    M = M.tocsr()
    MT = M.T.tocsr()
    MT.sort_indices()
    return _to_torch_csr(M, dtype, device), _to_torch_csr(MT, dtype, device)


def _csr_nbytes(t: torch.Tensor) -> int:
    return sum(a.numel() * a.element_size() for a in (t.crow_indices(), t.col_indices(), t.values()))


class _SparseTransform(RayTransform):
    """Shared code of the sparse backends: a CSR pair applied to flattened images."""

    M: torch.Tensor
    MT: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Memory held by the stored matrices A and Aᵀ, in bytes."""
        return _csr_nbytes(self.M) + _csr_nbytes(self.MT)

    @property
    def nnz(self) -> int:
        return int(self.M.values().numel())

    @staticmethod
    def _mul(M, x):
        n = x.shape[0]
        if n == 1:  # sparse × vector is 2–3× faster than sparse × (d, 1) matrix in torch
            return torch.mv(M, x.reshape(-1)).unsqueeze(0)
        return (M @ x.reshape(n, -1).T.contiguous()).T

    def _apply(self, x):
        return self._mul(self.M, x)

    def _adjoint(self, y):
        return self._mul(self.MT, y)


# ---------------------------------------------------------------------------------------
# astra-cpu
# ---------------------------------------------------------------------------------------
def _slicewise_2d_vectors(g: Geometry) -> np.ndarray | None:
    """2D vectors of a 3D parallel geometry whose rows are the volume's axial slices, else None."""
    vec = g.to_vectors()
    r, d, u, v = vec[:, 0:3], vec[:, 3:6], vec[:, 6:9], vec[:, 9:12]
    rows = g.det_shape[0]
    tol = 1e-9 * max(1.0, float(np.abs(vec).max()))
    flat = np.abs(np.stack([r[:, 2], d[:, 2], u[:, 2], v[:, 0], v[:, 1]], 1)).max() <= tol
    if not (flat and rows == g.vol_shape[0] and np.allclose(v[:, 2], g.voxel_size, rtol=1e-9, atol=0)):
        return None
    return np.concatenate([r[:, :2], d[:, :2], u[:, :2]], 1)


class AstraCpuTransform(_SparseTransform, key="astra-cpu"):
    """ASTRA's CPU projector (2D 'linear' parallel / 'line_fanflat' fan) as a sparse CSR pair.

    A 3D parallel-beam geometry whose detector rows coincide with the axial slices (no tilt,
    row spacing = voxel size, rows = z) is the 2D matrix applied to all slices in one sparse
    × dense product.
    """

    priority = 10

    @classmethod
    def unsupported(cls, g):
        if g.ndim == 2:
            return None if g.beam in ("parallel", "fan") else f"{g.beam} beam is not 2D"
        if g.beam != "parallel":
            return "ASTRA has no CPU 3D projector; use backend 'cpu-cone' (or 'astra-cuda' on a GPU)"
        if _slicewise_2d_vectors(g) is None:
            return ("3D parallel beam runs slice by slice only when detector rows = volume slices "
                    f"(rows {g.det_shape[0]} vs z {g.vol_shape[0]}), row spacing = voxel size and no tilt; "
                    "use backend 'cpu-cone'")
        return None

    def __init__(self, geometry, backend="astra-cpu", device=None, dtype=torch.float32):
        super().__init__(geometry, backend, device, dtype)
        g = geometry
        if g.ndim == 2:
            vec2, beam2, vol2 = g.to_vectors(), g.beam, g.vol_shape
        else:
            vec2, beam2, vol2 = _slicewise_2d_vectors(g), "parallel", g.vol_shape[1:]
        self.slicewise = g.ndim == 3
        n_cols = g.det_shape[-1]
        M = _astra.matrix2d(beam2, vol2, g.voxel_size, n_cols, vec2)
        self.M, self.MT = _csr_pair(M, dtype, self.device)
        self._n_views, self._n_cols = g.n_angles, n_cols

    def _apply(self, x):
        if not self.slicewise:
            return super()._apply(x)
        n, nz, ny, nx = x.shape
        X = x.permute(2, 3, 0, 1).reshape(ny * nx, n * nz)  # one column per (batch, slice)
        Y = self.M @ X  # shape: (angles * cols, n * nz)
        return Y.reshape(self._n_views, self._n_cols, n, nz).permute(2, 0, 3, 1)

    def _adjoint(self, y):
        if not self.slicewise:
            return super()._adjoint(y)
        n, na, nr, nc = y.shape
        Y = y.permute(1, 3, 0, 2).reshape(na * nc, n * nr)
        X = self.MT @ Y  # shape: (ny * nx, n * nz)
        ny, nx = self.domain_shape[1:]
        return X.reshape(ny, nx, n, nr).permute(2, 3, 0, 1)


# ---------------------------------------------------------------------------------------
# cpu-cone
# ---------------------------------------------------------------------------------------
_CONE_CACHE: dict = {}
_CONE_CACHE_MAX = 4


class ConeCpuTransform(_SparseTransform, key="cpu-cone"):
    """dipuq's trilinear ray-driven projector (:mod:`dipuq.operators.cone_cpu`) as a CSR pair.

    Takes every geometry (2D ones as one-slice 3D). The matrices are cached in-process per
    geometry (at most a few), since building them takes seconds at 64³.
    """

    step: float = 0.5
    priority = 20

    def __init__(self, geometry, backend="cpu-cone", device=None, dtype=torch.float32):
        super().__init__(geometry, backend, device, dtype)
        key = (geometry, self.step)
        M = _CONE_CACHE.get(key)
        if M is None:
            M = build_matrix(geometry, step=self.step)
            if len(_CONE_CACHE) >= _CONE_CACHE_MAX:
                _CONE_CACHE.pop(next(iter(_CONE_CACHE)))
            _CONE_CACHE[key] = M
        self.M, self.MT = _csr_pair(M, dtype, self.device)


# ---------------------------------------------------------------------------------------
# astra-cuda
# ---------------------------------------------------------------------------------------
class AstraCudaTransform(RayTransform, key="astra-cuda"):
    """ASTRA's CUDA projectors with direct FP/BP on torch CUDA tensors (data stays on the GPU).

    Every geometry runs through ASTRA's 3D GPU code (2D as one slice). ASTRA's FP (ray-driven)
    and BP (voxel-driven) are adjoint only up to interpolation differences; a single scale
    ``bp_scale`` (measured once at construction from a positive-vector dot product) removes any
    global scaling mismatch, so Aᵀ is the adjoint up to ASTRA's interpolation error.
    """

    requires_cuda = True
    priority = 0

    def __new__(cls, *a, **kw):  # direct construction must not bypass the CUDA check
        _astra.require_cuda("backend 'astra-cuda'")
        return super().__new__(cls)

    def default_device(self):
        return "cuda"

    def __init__(self, geometry, backend="astra-cuda", device=None, dtype=torch.float32):
        _astra.require_cuda("backend 'astra-cuda'")
        super().__init__(geometry, backend, device, dtype)
        if dtype != torch.float32:
            raise DipuqError("backend 'astra-cuda' computes in float32 only")
        if self.device.type != "cuda":
            raise DipuqError(f"backend 'astra-cuda' needs a CUDA device, got device={self.device}")
        beam3, self._vol3, self._det3, vec3 = lift3d(geometry)
        self._proj = _astra.CudaProjector3D(beam3, self._vol3, geometry.voxel_size, self._det3, vec3,
                                            gpu_index=self.device.index or 0)
        self.bp_scale = 1.0
        self.bp_scale = self._calibrate()

    def _fp1(self, vol):
        """vol (z, y, x) contiguous -> (angles, rows, cols)."""
        rows, cols = self._det3
        out = torch.empty((rows, self.geometry.n_angles, cols), dtype=torch.float32, device=self.device)
        torch.cuda.synchronize(self.device)  # ASTRA runs on its own stream: inputs must be ready
        self._proj.fp(vol, out)
        return out.transpose(0, 1)

    def _bp1(self, proj):
        """proj (angles, rows, cols) -> (z, y, x)."""
        out = torch.empty(self._vol3, dtype=torch.float32, device=self.device)
        p = proj.transpose(0, 1).contiguous()  # ASTRA order (rows, angles, cols)
        torch.cuda.synchronize(self.device)
        self._proj.bp(p, out)
        return out

    def _apply(self, x):
        n = x.shape[0]
        xs = x.reshape(n, *self._vol3)
        out = torch.stack([self._fp1(xs[i].contiguous()) for i in range(n)])
        return out.reshape(n, *self.range_shape)

    def _adjoint(self, y):
        n = y.shape[0]
        rows, cols = self._det3
        ys = y.reshape(n, self.geometry.n_angles, rows, cols)
        out = torch.stack([self._bp1(ys[i]) for i in range(n)])
        if self.bp_scale != 1.0:
            out = out * self.bp_scale
        return out.reshape(n, *self.domain_shape)

    def _calibrate(self) -> float:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.rand((1, *self.domain_shape), generator=gen).to(self.device)
        y = torch.rand((1, *self.range_shape), generator=gen).to(self.device)
        lhs = float((self._apply(x).double() * y.double()).sum())
        rhs = float((x.double() * self._adjoint(y).double()).sum())
        if not (math.isfinite(lhs) and math.isfinite(rhs)) or rhs == 0:
            raise DipuqError("ASTRA CUDA returned non-finite or zero projections: check the geometry")
        scale = lhs / rhs
        log.info("astra-cuda: back-projection scale %.6f applied to match the forward projector", scale)
        return scale
