"""Tomographic acquisition geometries (2D parallel / fan, 3D parallel / cone, vector).

Coordinates (the dipuq convention, matching ASTRA's 3D convention):

- A volume has shape ``(y, x)`` in 2D and ``(z, y, x)`` in 3D. Voxel ``(k, j, i)`` has its centre
  at ``x = (i - (nx - 1)/2) * voxel_size``, ``y = (j - (ny - 1)/2) * voxel_size``,
  ``z = (k - (nz - 1)/2) * voxel_size``: every axis increases with its index, the origin is
  the volume centre. All lengths are in one physical unit (voxel units when ``voxel_size=1``).
- Projections have shape ``(angles, cols)`` in 2D and ``(angles, rows, cols)`` in 3D.
- Every geometry is described by ASTRA-style *vectors*, one row per angle:
  2D ``(r_x, r_y, d_x, d_y, u_x, u_y)`` and 3D ``(r_x, r_y, r_z, d_x, d_y, d_z, u_x, u_y, u_z,
  v_x, v_y, v_z)``. ``r`` is the ray direction (parallel) or source position (fan/cone), ``d`` the
  detector centre, ``u`` the step between neighbouring detector columns and ``v`` between rows.
  Detector pixel ``(row, col)`` is centred at ``d + (col - (cols-1)/2) u + (row - (rows-1)/2) v``.
- The standard circular geometries follow ASTRA's formulas: at angle θ the parallel ray
  direction is ``(sin θ, -cos θ, 0)``, the source sits at ``SO (sin θ, -cos θ, 0)``, the detector
  centre at ``OD (-sin θ, cos θ, 0)`` and ``u = det_spacing (cos θ, sin θ, 0)``, ``v = (0, 0,
  det_row_spacing)``. The rotation axis is z. A centre-of-rotation offset ``cor_offset`` (in
  detector pixels) says where the rotation axis projects: onto column ``(cols - 1)/2 +
  cor_offset`` (so the detector centre moves by ``-cor_offset * u``). ASTRA's
  ``geom_postalignment(g, s)`` is the same with ``s = -cor_offset``.

Angles are radians everywhere inside dipuq; pass ``units="deg"`` at the edges.

Every geometry also reads as a 3D one (:func:`lift3d`: a 2D geometry is the one-slice volume
``(1, y, x)`` with a one-row detector) and as a list of rays (:func:`rays`: origin, unit direction
and parameter range of the ray through each detector pixel), which the projectors, the analytic
reconstructions and the exact phantom line integrals of :mod:`dipuq.testing` share.

Orientation against ASTRA (and tools built on it). dipuq's 3D volumes ``(z, y, x)`` have the
layout of ASTRA's 3D volumes: a 3D reconstruction by ASTRA (e.g. FDK_CUDA, SIRT3D_CUDA) with
the same vectors lines up as is. ASTRA's *2D* images store row ``j`` at ``y = -(j - (ny-1)/2)``,
so for the same angles and detector a 2D (or slice-by-slice) ASTRA reconstruction is the
**up–down mirror** of dipuq's image: ``dipuq_image == astra_image[::-1, :]``.
:func:`to_astra_orientation` does that flip (measured on the tooth: correlation 0.9997 after
the flip, 0.57 without; ``tests/test_orientation.py``).

Example::

    >>> g = Geometry.parallel2d(angles=np.linspace(0, np.pi, 60, endpoint=False),
    ...                         vol_shape=(128, 128), det_count=183)
    >>> g.proj_shape
    (60, 183)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from dipuq.errors import DipuqError

__all__ = ["Geometry", "BEAMS", "to_radians", "to_astra_orientation", "from_astra_orientation", "lift3d", "rays"]

BEAMS = ("parallel", "fan", "cone")


def to_radians(angles, units: str = "rad") -> np.ndarray:
    """Angles as a float64 radians array; ``units`` is ``"rad"`` or ``"deg"``."""
    a = np.asarray(angles, dtype=np.float64).reshape(-1)
    if units in ("deg", "degree", "degrees"):
        return np.deg2rad(a)
    if units not in ("rad", "radian", "radians"):
        raise DipuqError(f"unknown angle units {units!r}: use 'rad' or 'deg'")
    return a


def to_astra_orientation(image, astra: str = "2d"):
    """A dipuq image in ASTRA's orientation: up–down mirrored for ASTRA 2D, unchanged for ASTRA 3D.

    ``image``: a dipuq 2D image ``(..., y, x)`` (NumPy array or torch tensor; a 3D volume
    ``(z, y, x)`` compared slice by slice with ASTRA 2D reconstructions works the same way);
    ``astra``: ``"2d"`` (ASTRA's 2D algorithms, e.g. FBP / FBP_CUDA / SIRT on a 2D geometry) or
    ``"3d"`` (ASTRA 3D: the same layout as dipuq, returned as is). The flip is its own inverse,
    so :func:`from_astra_orientation` is the same function.

    Example: ``np.allclose(to_astra_orientation(x), x[::-1])`` for a 2D NumPy image ``x``.
    """
    if astra == "3d":
        return image
    if astra != "2d":
        raise DipuqError(f"astra must be '2d' or '3d', got {astra!r}")
    if getattr(image, "ndim", 0) < 2:
        raise DipuqError("to_astra_orientation needs an image with at least 2 axes (..., y, x)")
    if hasattr(image, "flip"):  # torch tensor (negative strides are not allowed there)
        return image.flip(-2)
    return np.asarray(image)[..., ::-1, :]


#: An ASTRA image in dipuq's orientation (the flip is an involution).
from_astra_orientation = to_astra_orientation


@dataclass(frozen=True, eq=False)
class Geometry:
    """A CT acquisition: beam type, angles, detector, volume grid.

    Parameters
    ----------
    beam : "parallel" | "fan" | "cone"  ("parallel" covers 2D and 3D; "fan" is 2D, "cone" 3D)
    angles : (n_angles,) radians
    vol_shape : (y, x) or (z, y, x)
    det_shape : (cols,) in 2D or (rows, cols) in 3D
    voxel_size : edge length of a voxel
    det_spacing : (col_spacing,) or (row_spacing, col_spacing)
    source_origin, origin_detector : distances for fan / cone beams
    cor_offset : centre-of-rotation offset in detector pixels (along u)
    vectors : explicit per-angle vectors (see module docs); overrides the circular description
    """

    beam: str
    angles: np.ndarray
    vol_shape: tuple[int, ...]
    det_shape: tuple[int, ...]
    voxel_size: float = 1.0
    det_spacing: tuple[float, ...] = (1.0,)
    source_origin: float | None = None
    origin_detector: float | None = None
    cor_offset: float = 0.0
    vectors: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.beam not in BEAMS:
            raise DipuqError(f"unknown geometry {self.beam!r}: expected one of {', '.join(BEAMS)}")
        set_("angles", np.asarray(self.angles, dtype=np.float64).reshape(-1))
        set_("vol_shape", tuple(int(n) for n in self.vol_shape))
        set_("det_shape", tuple(int(n) for n in self.det_shape))
        spacing = np.broadcast_to(np.asarray(self.det_spacing, dtype=np.float64).reshape(-1), (len(self.det_shape),))
        set_("det_spacing", tuple(float(s) for s in spacing))
        nd = len(self.vol_shape)
        if nd not in (2, 3):
            raise DipuqError(f"vol_shape must have 2 or 3 entries, got {self.vol_shape}")
        if len(self.det_shape) != nd - 1:
            raise DipuqError(f"a {nd}D volume needs a {nd - 1}D detector shape, got det_shape={self.det_shape}")
        if min(self.vol_shape + self.det_shape) < 1:
            raise DipuqError(f"shapes must be positive: vol_shape={self.vol_shape}, det_shape={self.det_shape}")
        if self.beam == "fan" and nd != 2:
            raise DipuqError("fan beam is 2D; use 'cone' for 3D")
        if self.beam == "cone" and nd != 3:
            raise DipuqError("cone beam is 3D; use 'fan' for 2D")
        if len(self.angles) == 0 and self.vectors is None:
            raise DipuqError("geometry needs at least one angle")
        if not np.all(np.isfinite(self.angles)):
            raise DipuqError("angles contain NaN or inf")
        if not (self.voxel_size > 0 and math.isfinite(self.voxel_size)):
            raise DipuqError(f"voxel_size must be positive, got {self.voxel_size}")
        if min(self.det_spacing) <= 0:
            raise DipuqError(f"det_spacing must be positive, got {self.det_spacing}")
        if self.beam in ("fan", "cone") and self.vectors is None:
            if self.source_origin is None or self.origin_detector is None:
                raise DipuqError(f"{self.beam} beam needs source_origin and origin_detector")
            if self.source_origin <= 0 or self.origin_detector < 0:
                raise DipuqError("source_origin must be > 0 and origin_detector >= 0")
            if self.source_origin <= self.voxel_size * math.hypot(*self.vol_shape[-2:]) / 2:
                raise DipuqError("the source lies inside the volume: increase source_origin")
        if self.vectors is not None:
            v = np.asarray(self.vectors, dtype=np.float64)
            want = 6 if nd == 2 else 12
            if v.ndim != 2 or v.shape[1] != want:
                raise DipuqError(f"vectors must have shape (n_angles, {want}) for a {nd}D geometry, got {v.shape}")
            set_("vectors", v)
            if len(self.angles) != len(v):
                set_("angles", np.arange(len(v), dtype=np.float64))

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def parallel2d(cls, angles, vol_shape, det_count=None, *, units="rad", **kw) -> Geometry:
        """2D parallel beam. ``det_count`` defaults to cover the volume's diagonal."""
        vol_shape = tuple(vol_shape)
        det_count = det_count or _default_det_count(vol_shape, kw)
        return cls("parallel", to_radians(angles, units), vol_shape, (det_count,), **kw)

    @classmethod
    def fan2d(cls, angles, vol_shape, det_count, source_origin, origin_detector, *, units="rad", **kw):
        return cls("fan", to_radians(angles, units), tuple(vol_shape), (det_count,),
                   source_origin=source_origin, origin_detector=origin_detector, **kw)

    @classmethod
    def parallel3d(cls, angles, vol_shape, det_shape=None, *, units="rad", **kw) -> Geometry:
        vol_shape = tuple(vol_shape)
        det_shape = tuple(det_shape) if det_shape is not None else (vol_shape[0], _default_det_count(vol_shape, kw))
        return cls("parallel", to_radians(angles, units), vol_shape, det_shape, **kw)

    @classmethod
    def cone3d(cls, angles, vol_shape, det_shape, source_origin, origin_detector, *, units="rad", **kw):
        return cls("cone", to_radians(angles, units), tuple(vol_shape), tuple(det_shape),
                   source_origin=source_origin, origin_detector=origin_detector, **kw)

    @classmethod
    def from_vectors(cls, beam, vectors, vol_shape, det_shape, voxel_size=1.0) -> Geometry:
        """A vector geometry (ASTRA's ``*_vec`` family) in dipuq coordinates."""
        v = np.asarray(vectors, dtype=np.float64)
        return cls(beam, np.arange(len(v), dtype=np.float64), tuple(vol_shape), tuple(det_shape),
                   voxel_size=voxel_size, vectors=v)

    # -- derived ------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.vol_shape)

    @property
    def n_angles(self) -> int:
        return len(self.vectors) if self.vectors is not None else len(self.angles)

    @property
    def proj_shape(self) -> tuple[int, ...]:
        return (self.n_angles, *self.det_shape)

    @property
    def is_vector(self) -> bool:
        return self.vectors is not None

    def to_vectors(self) -> np.ndarray:
        """Per-angle vectors (n_angles, 6) in 2D or (n_angles, 12) in 3D; see module docs."""
        if self.vectors is not None:
            return self.vectors.copy()
        th = self.angles
        s, c, z = np.sin(th), np.cos(th), np.zeros_like(th)
        du = self.det_spacing[-1]
        u = np.stack([c * du, s * du, z], 1)
        if self.beam == "parallel":
            r = np.stack([s, -c, z], 1)
            d = np.zeros_like(r)
        else:
            r = self.source_origin * np.stack([s, -c, z], 1)
            d = self.origin_detector * np.stack([-s, c, z], 1)
        d = d - self.cor_offset * u
        if self.ndim == 2:
            return np.concatenate([r[:, :2], d[:, :2], u[:, :2]], 1)
        v = np.stack([z, z, np.full_like(th, self.det_spacing[0])], 1)
        return np.concatenate([r, d, u, v], 1)

    def subset(self, index) -> Geometry:
        """The same geometry restricted to some angles (index array, slice or boolean mask)."""
        idx = np.arange(self.n_angles)[index]
        vec = None if self.vectors is None else self.vectors[idx]
        return dataclasses.replace(self, angles=self.angles[idx], vectors=vec)

    def replace(self, **changes) -> Geometry:
        return dataclasses.replace(self, **changes)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["angles"] = self.angles.tolist()
        d["vol_shape"], d["det_shape"], d["det_spacing"] = list(self.vol_shape), list(self.det_shape), list(self.det_spacing)
        d["vectors"] = None if self.vectors is None else self.vectors.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        d = dict(d)
        if d.get("vectors") is not None:
            d["vectors"] = np.asarray(d["vectors"], dtype=np.float64)
        return cls(**d)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        return a == b

    def __hash__(self):
        return hash(repr(sorted((k, repr(v)) for k, v in self.to_dict().items())))

    def angles_missing_volume(self) -> np.ndarray:
        """Indices of angles at which no detector ray passes through the volume (should be empty).

        A ray hits when its distance from the origin is below the radius of the volume's bounding
        sphere (circle in 2D). Rays are tested for every column on the first, middle and last
        detector rows and every row on the middle column, which is enough to catch a centre of
        rotation or detector shifted off the object (``cor_offset = 1e6``) before any work.
        """
        vec = self.to_vectors()
        nd = self.ndim
        r, d, u = vec[:, :nd], vec[:, nd:2 * nd], vec[:, 2 * nd:3 * nd]
        radius = self.voxel_size * math.sqrt(sum(n * n for n in self.vol_shape)) / 2

        def picks(n: int, spacing: float) -> np.ndarray:
            # evenly spaced detector positions (ends included) closer than the volume's radius
            k = min(n, max(65, 2 * int(math.ceil(n * spacing / radius)) + 1))
            return np.unique(np.round(np.linspace(0, n - 1, k))) - (n - 1) / 2

        cols = self.det_shape[-1]
        c = picks(cols, float(np.linalg.norm(u[0])) if len(u) else 1.0)
        if nd == 2:
            pix = d[:, None, :] + c[None, :, None] * u[:, None, :]  # shape: (angles, cols, 2)
        else:
            v = vec[:, 9:12]
            rr = picks(self.det_shape[0], float(np.linalg.norm(v[0])))
            mid_r, mid_c = rr[np.argmin(np.abs(rr))], c[np.argmin(np.abs(c))]
            grid = [(rr[[0, len(rr) // 2, -1]][:, None], c[None, :]), (rr[:, None], np.array([[mid_c]])),
                    (np.array([[mid_r]]), c[None, :])]
            pix = np.concatenate([
                (d[:, None, None, :] + a[None, :, :, None] * v[:, None, None, :] + b[None, :, :, None] * u[:, None, None, :]
                 ).reshape(len(vec), -1, 3) for a, b in (np.broadcast_arrays(*p) for p in grid)], axis=1)
        if self.beam == "parallel":
            start, direction = pix, np.broadcast_to(r[:, None, :], pix.shape)
        else:
            start, direction = np.broadcast_to(r[:, None, :], pix.shape), pix - r[:, None, :]
        norm = np.linalg.norm(direction, axis=-1, keepdims=True)
        direction = direction / np.where(norm > 0, norm, 1.0)
        closest = start - np.sum(start * direction, axis=-1, keepdims=True) * direction
        dist = np.linalg.norm(closest, axis=-1)  # shape: (angles, rays)
        return np.flatnonzero(~np.any(dist <= radius, axis=1))

    def missing_wedge_deg(self) -> float:
        """Width in degrees of the largest range of in-plane ray directions that no view measures
        (a limited-angle scan's missing wedge), 0 when the views cover every direction.

        Directions are taken modulo 180° in the plane the rays rotate in (the plane of the views'
        central rays: their two leading singular vectors), so a 360° scan counts its opposite views
        once. A parallel view measures one direction, a fan/cone view the range of its central
        ray ± half its fan angle. Gaps up to max(4 × 180°/n_views, 15°) are sparse sampling, not a
        wedge (20 views over 180° leave 9° gaps); a wider gap is reported less the median gap.
        """
        vec = self.to_vectors()
        nd = self.ndim
        src, det, u = vec[:, :nd], vec[:, nd:2 * nd], vec[:, 2 * nd:3 * nd]
        central = src if self.beam == "parallel" else det - src
        central = central / np.linalg.norm(central, axis=1, keepdims=True)
        if nd == 3:  # the rotation plane: where the central rays vary most
            basis = np.linalg.svd(central, full_matrices=False)[2][:2]
            central = central @ basis.T
        theta = np.sort(np.mod(np.arctan2(central[:, 1], central[:, 0]), np.pi))
        half_fan = 0.0
        if self.beam != "parallel":
            width = float(np.linalg.norm(u[0])) * self.det_shape[-1] / 2
            half_fan = math.atan2(width, float(np.linalg.norm(det[0] - src[0])))
        gaps = np.diff(np.concatenate([theta, theta[:1] + np.pi]))
        gaps = np.maximum(gaps - 2 * half_fan, 0.0)
        widest = float(np.degrees(gaps.max()))
        if widest <= max(4 * 180.0 / len(theta), 15.0):
            return 0.0
        return widest - float(np.degrees(np.median(gaps)))

    def describe(self) -> str:
        kind = {"parallel": f"{self.ndim}D parallel", "fan": "2D fan", "cone": "3D cone"}[self.beam]
        vec = " (vector)" if self.is_vector else ""
        return (f"{kind}{vec} beam, {self.n_angles} angles, detector {self.det_shape}, "
                f"volume {self.vol_shape} @ voxel {self.voxel_size:g}")


def lift3d(geometry: Geometry) -> tuple[str, tuple[int, int, int], tuple[int, int], np.ndarray]:
    """A geometry as a 3D one: ``(beam3d, vol_shape (z,y,x), det_shape (rows,cols), vectors (n,12))``.

    2D parallel -> 3D parallel and 2D fan -> cone, on the one-slice volume ``(1, y, x)`` with a
    one-row detector whose row step is ``v = (0, 0, voxel_size)`` (dipuq's 2D coordinates are the
    z = 0 plane of its 3D ones: no axis flip).
    """
    vec = geometry.to_vectors()
    if geometry.ndim == 3:
        return geometry.beam, tuple(geometry.vol_shape), tuple(geometry.det_shape), vec
    n = len(vec)
    z = np.zeros((n, 1))
    v = np.tile([0.0, 0.0, geometry.voxel_size], (n, 1))
    vec3 = np.concatenate([vec[:, 0:2], z, vec[:, 2:4], z, vec[:, 4:6], z, v], 1)
    beam = "cone" if geometry.beam == "fan" else "parallel"
    return beam, (1, *geometry.vol_shape), (1, geometry.det_shape[0]), vec3


def rays(geometry: Geometry, views=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rays of (some) views: ``origin (R,3), unit direction (R,3), t_min (R,), t_max (R,)``.

    Points are ``origin + t * direction`` with ``t`` in world units, ``R = n_views * rows * cols``
    ordered ``(view, row, col)``. Cone rays run from the source (t = 0) to the pixel; parallel
    rays are infinite lines through the pixel centre.
    """
    beam, _, (rows, cols), vec = lift3d(geometry)
    if views is not None:
        vec = vec[views]
    r, d, u, v = vec[:, 0:3], vec[:, 3:6], vec[:, 6:9], vec[:, 9:12]
    cc = np.arange(cols) - (cols - 1) / 2
    rr = np.arange(rows) - (rows - 1) / 2
    # shape: (views, rows, cols, 3)
    pix = d[:, None, None] + cc[None, None, :, None] * u[:, None, None] + rr[None, :, None, None] * v[:, None, None]
    pix = pix.reshape(-1, 3)
    rep = rows * cols
    if beam == "cone":
        src = np.repeat(r, rep, axis=0)
        e = pix - src
        length = np.linalg.norm(e, axis=1)
        if np.any(length == 0):
            raise DipuqError("a detector pixel coincides with the source: check the geometry vectors")
        return src, e / length[:, None], np.zeros_like(length), length
    norm = np.linalg.norm(r, axis=1)
    if np.any(norm == 0):
        raise DipuqError("a parallel-beam ray direction is zero: check the geometry vectors")
    e = np.repeat(r / norm[:, None], rep, axis=0)
    inf = np.full(len(pix), np.inf)
    return pix, e, -inf, inf


def _default_det_count(vol_shape, kw) -> int:
    spacing = np.asarray(kw.get("det_spacing", 1.0), dtype=np.float64).reshape(-1)[-1]
    diag = math.hypot(*vol_shape[-2:]) * kw.get("voxel_size", 1.0) / spacing
    return int(math.ceil(diag)) + 1
