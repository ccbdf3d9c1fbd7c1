"""Reference reconstructions: FBP, FDK (analytic) and SIRT, CGLS (iterative), on torch tensors.

- :func:`fbp`: filtered back-projection for 2D parallel, 2D fan (flat detector) and 3D parallel
  beams, ``f(x) = (π / n_angles) Σ_θ W(x, θ) (h * w p_θ)(π_θ(x))``.
- :func:`fdk`: Feldkamp–Davis–Kress for 3D circular cone beam: the fan-beam formula applied row
  by row of a flat detector.

Both are one implementation (:func:`filtered_backprojection`): cosine pre-weighting ``w`` (1 for
parallel beams), a ramp filter ``h`` along detector rows in the coordinates of the rotation axis
(detector spacing divided by the magnification), and a *voxel-driven* back-projection that
projects every voxel centre onto the detector of each view through the geometry's vectors
(so centre-of-rotation offsets and vector geometries need no special case), interpolates the
filtered projections bilinearly, and weights by ``W = (SO / depth)²`` for diverging beams. The
result is quantitative: the FBP of ``A f`` approximates ``f`` in the units of ``f`` (tested).
Angles are assumed to cover π (parallel) or 2π (fan/cone) evenly; short scans would need Parker
weights, which are not implemented. It runs on any device and takes leading batch dims.

- :func:`sirt` and :func:`cgls` work for any :class:`LinearOperator`; each is a generator of
  iterates (:func:`sirt_iterates`, :func:`cgls_iterates`) plus a driver that runs ``n_iter`` steps.

Example::

    >>> A = RayTransform(Geometry.parallel2d(np.linspace(0, np.pi, 90, endpoint=False), (64, 64)))
    >>> x = torch.zeros(64, 64); x[20:44, 20:44] = 1
    >>> rec = fbp(A, A(x))          # ≈ x
    >>> rec2 = cgls(A, A(x), 20)    # ≈ x
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dipuq.errors import DipuqError, DivergenceError
from dipuq.geometry import lift3d
from dipuq.operators import _astra
from dipuq.operators.base import LinearOperator

__all__ = ["FILTERS", "fbp", "fdk", "analytic", "ray_coverage", "sirt", "cgls", "sirt_iterates", "cgls_iterates",
           "IterState", "ramp_filter", "filtered_backprojection"]

FILTERS = ("ramp", "shepp-logan", "cosine", "hann")


# ---------------------------------------------------------------------------------------
# analytic
# ---------------------------------------------------------------------------------------
def _check_geometry_op(A, y):
    g = getattr(A, "geometry", None)
    if g is None:
        raise DipuqError(f"analytic reconstruction needs a RayTransform (with .geometry), got {type(A).__name__}")
    if not isinstance(y, torch.Tensor):
        raise DipuqError(f"projections must be a torch.Tensor, got {type(y).__name__}")
    k = len(g.proj_shape)
    if y.ndim < k or tuple(y.shape[y.ndim - k:]) != tuple(g.proj_shape):
        raise DipuqError(f"projections must end in shape {tuple(g.proj_shape)} for {g.describe()}, "
                         f"got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise DipuqError("projections contain NaN or inf")
    return g


def ramp_filter(n_pad: int, filter: str = "ramp", device=None, dtype=torch.float32) -> torch.Tensor:
    """Frequency response (n_pad//2 + 1,) of the discrete ramp filter for unit sample spacing.

    The DFT of the band-limited Ram-Lak kernel ``h[0] = 1/4, h[k odd] = -1/(πk)², h[k even] = 0``
    (exact at DC, unlike sampling |ω|), times an apodisation window of the relative frequency
    ``ω/ω_Nyquist``: "ramp" 1, "shepp-logan" sinc(ω/2), "cosine" cos(πω/2), "hann" (1+cos πω)/2.
    """
    if filter not in FILTERS:
        raise DipuqError(f"unknown filter {filter!r}: use one of {', '.join(FILTERS)}")
    k = np.fft.fftfreq(n_pad, 1.0 / n_pad)  # integer offsets, circular
    h = np.zeros(n_pad)
    h[0] = 0.25
    odd = (np.abs(k) % 2) == 1
    h[odd] = -1.0 / (np.pi * k[odd]) ** 2
    H = np.fft.rfft(h).real
    w = np.arange(len(H)) / (n_pad / 2)  # relative frequency in [0, 1]
    if filter == "shepp-logan":
        H = H * np.sinc(w / 2)
    elif filter == "cosine":
        H = H * np.cos(np.pi * w / 2)
    elif filter == "hann":
        H = H * 0.5 * (1 + np.cos(np.pi * w))
    return torch.as_tensor(H, dtype=dtype, device=device)


def _view_frames(beam, vec):
    """Per-view detector frame: unit normal n̂ towards the detector, SO, SDD (cone only)."""
    s, d, u, v = vec[:, 0:3], vec[:, 3:6], vec[:, 6:9], vec[:, 9:12]
    n = np.cross(u, v)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    if beam == "cone":
        sign = np.sign(np.einsum("ij,ij->i", d - s, n))
        n = n * sign[:, None]
        sdd = np.einsum("ij,ij->i", d - s, n)
        so = -np.einsum("ij,ij->i", s, n)
        if np.any(so <= 0) or np.any(sdd <= 0):
            raise DipuqError("cone/fan geometry has the volume centre behind the source: cannot filter")
        return n, so, sdd
    return n, None, None


def _voxel_to_detector(beam, s, d, u, v, nrm, so, affine):
    """Where every voxel centre lands on one view's detector: ``(a, b, weight)``.

    ``a``, ``b`` are the detector coordinates (in units of ``u`` and ``v``, relative to the
    detector centre ``d``) of the projection of each voxel centre, shape ``(nz, ny, nx)``; the
    weight is ``(SO / depth)²`` for a diverging beam, None for a parallel one. ``affine(c, c0)``
    evaluates ``c·X + c0`` on the voxel grid.
    """
    G = np.array([[u @ u, u @ v], [u @ v, v @ v]])
    Gi = np.linalg.inv(G)
    us, vs_ = Gi[0, 0] * u + Gi[0, 1] * v, Gi[1, 0] * u + Gi[1, 1] * v  # dual basis
    if beam == "parallel":
        r = s
        rn = r @ nrm
        coords = []
        for w in (us, vs_):  # rel·w is affine in X (rel = X + t r - d, t = (d - X)·n / r·n)
            c = w - nrm * (r @ w) / rn
            c0 = -d @ w + (d @ nrm) * (r @ w) / rn
            coords.append(affine(c, c0))
        a, b = coords
        return a, b, None
    den = affine(nrm, -s @ nrm)  # depth of the voxel along n̂: (X - s)·n̂
    if np.any(den <= 0):
        raise DipuqError("part of the volume lies behind the source: cannot back-project")
    N = (d - s) @ nrm
    a = (s - d) @ us + N * affine(us, -s @ us) / den
    b = (s - d) @ vs_ + N * affine(vs_, -s @ vs_) / den
    return a, b, (so / den) ** 2


def filtered_backprojection(A, y: torch.Tensor, filter: str = "ramp") -> torch.Tensor:
    """FBP/FDK of projections ``y (*batch, *proj_shape)`` -> ``(*batch, *vol_shape)``. See module docs."""
    g = _check_geometry_op(A, y)
    beam, vol3, (rows, cols), vec = lift3d(g)
    nz, ny, nx = vol3
    V = len(vec)
    lead = y.shape[: y.ndim - len(g.proj_shape)]
    dev = y.device
    dt = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    p = y.reshape(-1, V, rows, cols).to(dt)  # shape: (B, views, rows, cols)
    s, d, u, v = vec[:, 0:3], vec[:, 3:6], vec[:, 6:9], vec[:, 9:12]
    n_hat, so, sdd = _view_frames(beam, vec)
    du = np.linalg.norm(u, axis=1)

    # 1. cosine pre-weighting (diverging beams) and the filter spacing at the rotation axis
    if beam == "cone":
        cc = np.arange(cols) - (cols - 1) / 2
        rr = np.arange(rows) - (rows - 1) / 2
        pix = d[:, None, None] + cc[None, None, :, None] * u[:, None, None] + rr[None, :, None, None] * v[:, None, None]
        cos_a = sdd[:, None, None] / np.linalg.norm(pix - s[:, None, None], axis=-1)  # shape: (views, rows, cols)
        p = p * torch.as_tensor(cos_a, dtype=dt, device=dev)
        spacing = du * so / sdd
    else:
        spacing = du
    # 2. ramp filter along the detector rows
    n_pad = 1 << int(math.ceil(math.log2(max(2 * cols, 2))))
    H = ramp_filter(n_pad, filter, dev, dt)
    q = torch.fft.irfft(torch.fft.rfft(p, n=n_pad, dim=-1) * H, n=n_pad, dim=-1)[..., :cols]
    q = q / torch.as_tensor(spacing, dtype=dt, device=dev)[:, None, None]
    # 3. voxel-driven back-projection
    vs = g.voxel_size
    xs = (np.arange(nx) - (nx - 1) / 2) * vs
    ys = (np.arange(ny) - (ny - 1) / 2) * vs
    zs = (np.arange(nz) - (nz - 1) / 2) * vs

    def affine(c, c0):  # c·X + c0 on the voxel grid, shape (nz, ny, nx)
        return (c[0] * xs[None, None, :] + c[1] * ys[None, :, None] + c[2] * zs[:, None, None]) + c0

    B = q.shape[0]
    out = torch.zeros((B, nz, ny * nx), dtype=dt, device=dev)
    qv = q.transpose(0, 1)  # shape: (views, B, rows, cols): batch as channels, one grid per view
    chunk = max(1, int(4_000_000 // (nz * ny * nx)))
    for v0 in range(0, V, chunk):
        grids, weights = [], []
        for i in range(v0, min(V, v0 + chunk)):
            a, b, wgt = _voxel_to_detector(beam, s[i], d[i], u[i], v[i], n_hat[i], so[i] if so is not None else None,
                                           affine)
            col = a + (cols - 1) / 2
            row = b + (rows - 1) / 2
            gx = 2 * col / (cols - 1) - 1 if cols > 1 else np.where(np.abs(col) < 1, 0.0, 2.0)
            gy = 2 * row / (rows - 1) - 1 if rows > 1 else np.where(np.abs(row) < 1, 0.0, 2.0)
            grids.append(np.stack([gx, gy], -1).reshape(nz, ny * nx, 2))
            weights.append(wgt)
        grid = torch.as_tensor(np.stack(grids), dtype=dt, device=dev)  # shape: (chunk, nz, ny*nx, 2)
        smp = F.grid_sample(qv[v0:v0 + len(grids)], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)  # shape: (chunk, B, nz, ny*nx)
        if weights[0] is not None:
            wt = torch.as_tensor(np.stack(weights).reshape(len(grids), 1, nz, ny * nx), dtype=dt, device=dev)
            smp = smp * wt
        out += smp.sum(0)
    out = out * (math.pi / V)
    return out.reshape(*lead, *g.vol_shape)


def fbp(A: LinearOperator, y: torch.Tensor, filter: str = "ramp") -> torch.Tensor:
    """Filtered back-projection for 2D parallel, 2D fan and 3D parallel beams (slice-wise).

    ``y (*batch, *proj_shape)`` -> ``(*batch, *vol_shape)``, quantitatively scaled (FBP of
    ``A f`` ≈ ``f``). ``filter`` is one of :data:`FILTERS`.
    """
    g = _check_geometry_op(A, y)
    if g.beam == "cone":
        raise DipuqError("fbp handles parallel and fan beams; use fdk (or analytic) for cone beam")
    return filtered_backprojection(A, y, filter)


def fdk(A: LinearOperator, y: torch.Tensor, filter: str = "ramp", impl: str = "torch") -> torch.Tensor:
    """Feldkamp–Davis–Kress reconstruction for cone beam: ``(*batch, angles, rows, cols)`` -> volume.

    ``impl="torch"`` (default, any device): dipuq's cosine weighting + row-wise ramp filter +
    voxel-driven back-projection with (SO/depth)² weights. ``impl="astra"``: ASTRA's FDK_CUDA
    (GPU only, ramp filter only).
    """
    g = _check_geometry_op(A, y)
    if g.beam != "cone":
        raise DipuqError(f"fdk is for cone beam; this is {g.describe()}: use fbp")
    if impl == "torch":
        return filtered_backprojection(A, y, filter)
    if impl != "astra":
        raise DipuqError(f"unknown fdk impl {impl!r}: use 'torch' or 'astra'")
    _astra.require_cuda("fdk(impl='astra')")
    _, vol3, det3, vec = lift3d(g)
    lead = y.shape[: y.ndim - 3]
    ys = y.reshape(-1, *g.proj_shape)
    outs = []
    for i in range(ys.shape[0]):
        prac = ys[i].transpose(0, 1).contiguous().cpu().numpy()
        outs.append(torch.from_numpy(_astra.fdk_cuda(vol3, g.voxel_size, det3, vec, prac)))
    return torch.stack(outs).to(device=y.device, dtype=y.dtype).reshape(*lead, *g.vol_shape)


def ray_coverage(A: LinearOperator, chunk: int = 8) -> torch.Tensor:
    """Share of the projection angles whose rays reach each voxel, shape ``A.domain_shape``.

    Voxel i is reached at angle a when the back-projection of the indicator of angle a's rows,
    ``(Aᵀ 1_a)_i``, exceeds a quarter of that back-projection's median over the voxels it
    reaches (interpolation tails and corner voxels that a ray only grazes do not count). 1 marks
    the region every angle sees; in a limited-angle or truncated scan the rest is seen from some
    directions only, where a reconstruction is unconstrained. Angles are the first axis of
    ``A.range_shape``; ``chunk`` angles are back-projected at a time.
    """
    n = int(A.range_shape[0])
    count = torch.zeros(A.domain_shape, dtype=torch.float64, device=A.device)
    for a0 in range(0, n, chunk):
        k = min(chunk, n - a0)
        e = torch.zeros((k, *A.range_shape), dtype=A.dtype, device=A.device)
        e[torch.arange(k), torch.arange(a0, a0 + k)] = 1.0
        bp = A.T(e).reshape(k, -1)  # shape: (k, d)
        for j in range(k):
            pos = bp[j][bp[j] > 0]
            if pos.numel():
                count += (bp[j] > 0.25 * pos.median()).reshape(A.domain_shape)
    return count / n


def analytic(A: LinearOperator, y: torch.Tensor, filter: str = "ramp") -> torch.Tensor:
    """The analytic reconstruction for the beam: :func:`fdk` for cone, :func:`fbp` otherwise."""
    g = _check_geometry_op(A, y)
    return fdk(A, y, filter) if g.beam == "cone" else fbp(A, y, filter)


# ---------------------------------------------------------------------------------------
# iterative
# ---------------------------------------------------------------------------------------
@dataclass
class IterState:
    """One iterate: step ``k`` (1-based), reconstruction ``x (*batch, *domain)`` and ‖y - A x‖ per batch."""

    k: int
    x: torch.Tensor
    residual: torch.Tensor


def _bdot(a, b, k):
    """Inner products over the trailing k dims, kept broadcastable: shape (*batch, 1, ..., 1)."""
    s = (a * b).flatten(a.ndim - k).sum(-1)
    return s.reshape(*s.shape, *([1] * k))


def _check_iter(A, y):
    if not isinstance(A, LinearOperator):
        raise DipuqError(f"expected a LinearOperator, got {type(A).__name__}")
    k = len(A.range_shape)
    if not isinstance(y, torch.Tensor) or y.ndim < k or tuple(y.shape[y.ndim - k:]) != tuple(A.range_shape):
        raise DipuqError(f"y must end in shape {tuple(A.range_shape)}, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if not torch.isfinite(y).all():
        raise DipuqError("y contains NaN or inf")
    return y.shape[: y.ndim - k]


def sirt_iterates(A: LinearOperator, y: torch.Tensor, x0: torch.Tensor | None = None,
                  nonneg: bool = False) -> Iterator[IterState]:
    """SIRT: ``x ← x + C Aᵀ R (y − A x)`` with ``R = 1/(A 1)``, ``C = 1/(Aᵀ 1)`` (0 where the sums vanish)."""
    lead = _check_iter(A, y)
    with torch.no_grad():
        ones_d = torch.ones(A.domain_shape, dtype=A.dtype, device=y.device)
        ones_r = torch.ones(A.range_shape, dtype=A.dtype, device=y.device)
        rs, cs = A(ones_d), A.adjoint(ones_r)
        R = torch.where(rs > 1e-6 * rs.max(), 1.0 / rs, torch.zeros_like(rs))
        C = torch.where(cs > 1e-6 * cs.max(), 1.0 / cs, torch.zeros_like(cs))
        x = torch.zeros(*lead, *A.domain_shape, dtype=A.dtype, device=y.device) if x0 is None else x0.clone()
        k = 0
        while True:
            r = y - A(x)
            k += 1
            x = x + C * A.adjoint(R * r)
            if nonneg:
                x = x.clamp_min(0)
            res = r.flatten(r.ndim - len(A.range_shape)).norm(dim=-1)
            if not torch.isfinite(res).all():
                raise DivergenceError(f"SIRT diverged at iteration {k}")
            yield IterState(k, x, res)


def cgls_iterates(A: LinearOperator, y: torch.Tensor, x0: torch.Tensor | None = None) -> Iterator[IterState]:
    """CGLS: conjugate gradients on the normal equations AᵀA x = Aᵀy (each batch item separately)."""
    lead = _check_iter(A, y)
    kd, kr = len(A.domain_shape), len(A.range_shape)
    with torch.no_grad():
        x = torch.zeros(*lead, *A.domain_shape, dtype=A.dtype, device=y.device) if x0 is None else x0.clone()
        r = y - A(x)
        s = A.adjoint(r)
        p = s
        gamma = _bdot(s, s, kd)
        k = 0
        while True:
            q = A(p)
            qq = _bdot(q, q, kr)
            alpha = torch.where(qq > 0, gamma / qq.clamp_min(torch.finfo(qq.dtype).tiny), torch.zeros_like(qq))
            x = x + alpha.reshape(*alpha.shape[: len(lead)], *([1] * kd)) * p
            r = r - alpha * q
            s = A.adjoint(r)
            gamma_new = _bdot(s, s, kd)
            beta = torch.where(gamma > 0, gamma_new / gamma.clamp_min(torch.finfo(gamma.dtype).tiny),
                               torch.zeros_like(gamma))
            p = s + beta * p
            gamma = gamma_new
            k += 1
            res = r.flatten(r.ndim - kr).norm(dim=-1)
            if not torch.isfinite(res).all():
                raise DivergenceError(f"CGLS diverged at iteration {k}")
            yield IterState(k, x, res)


def _run(it: Iterator[IterState], n_iter: int) -> torch.Tensor:
    if int(n_iter) < 1:
        raise DipuqError(f"n_iter must be ≥ 1, got {n_iter}")
    state = None
    for state in it:
        if state.k >= n_iter:
            break
    return state.x


def sirt(A: LinearOperator, y: torch.Tensor, n_iter: int = 100, x0=None, nonneg: bool = False) -> torch.Tensor:
    """Run ``n_iter`` SIRT iterations (:func:`sirt_iterates`); returns ``(*batch, *domain_shape)``."""
    return _run(sirt_iterates(A, y, x0, nonneg), n_iter)


def cgls(A: LinearOperator, y: torch.Tensor, n_iter: int = 20, x0=None) -> torch.Tensor:
    """Run ``n_iter`` CGLS iterations (:func:`cgls_iterates`); returns ``(*batch, *domain_shape)``."""
    return _run(cgls_iterates(A, y, x0), n_iter)
