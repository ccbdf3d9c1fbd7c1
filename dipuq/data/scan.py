"""A CT scan: line-integral projections ``y`` of an unknown volume ``x`` through a geometry ``A``.

A :class:`Scan` holds the measured data in the form the rest of dipuq uses, ``y ≈ A x + noise``:

- ``projections``: line integrals, float32, ``(angles, cols)`` in 2D, ``(angles, rows, cols)``
  in 3D (the layout :attr:`dipuq.geometry.Geometry.proj_shape` prescribes);
- ``geometry``: the :class:`~dipuq.geometry.Geometry` that defines ``A``;
- optionally the raw data they came from: ``counts`` (same shape as ``projections``) and the
  ``flat`` (open beam) and ``dark`` (no beam) fields (detector shape), with
  ``projections = -log(clip((counts - dark) / (flat - dark), floor))`` (:func:`line_integrals`);
- optionally a ``reference`` volume (ground truth for simulations, or a high-dose
  reconstruction) of shape ``geometry.vol_shape``, and a ``noise_std`` estimate (scalar, in
  projection units).

Scans save to and load from the NPZ scan format the CLI accepts (``docs/scan-format.md``).

Example::

    >>> import numpy as np
    >>> from dipuq.geometry import Geometry
    >>> g = Geometry.parallel2d(np.linspace(0, np.pi, 30, endpoint=False), (32, 32))
    >>> s = Scan(np.zeros(g.proj_shape, np.float32), g, name="zeros")
    >>> s.save("/tmp/zeros.npz"); Scan.load("/tmp/zeros.npz").projections.shape
    (30, 47)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dipuq._io import atomic_path
from dipuq.errors import DataError
from dipuq.geometry import BEAMS, Geometry

__all__ = ["Scan", "line_integrals", "MAX_BAD_FRACTION", "DEFAULT_FLOOR"]

#: Raw data may contain a few dead pixels (flat <= dark, or zero counts): a real detector does.
#: They are tolerated (and repaired by preprocessing) up to this fraction of all values; more
#: means the data are broken (e.g. flat and dark swapped) and validation fails.
MAX_BAD_FRACTION = 0.01

#: Default lower clip of the transmission ratio (counts - dark) / (flat - dark) before ``-log``:
#: line integrals are then at most -log(1e-3) ≈ 6.9, i.e. 0.1 % transmission.
DEFAULT_FLOOR = 1e-3


@dataclass(eq=False)
class Scan:
    """Line-integral projections ``y`` of a volume through a geometry, plus optional raw data.

    Parameters
    ----------
    projections : line integrals, ``geometry.proj_shape`` = (angles, cols) | (angles, rows, cols)
    geometry : the acquisition geometry
    counts : raw detector counts, same shape as ``projections`` (optional; needs flat and dark)
    flat, dark : open-beam and dark fields, detector shape ``geometry.det_shape``
    reference : a reference volume, ``geometry.vol_shape`` (optional)
    noise_std : estimated noise standard deviation of ``projections`` (optional, scalar)
    name : a short label
    meta : free-form JSON-serialisable facts (source, preprocessing, units)

    Construction validates (see :meth:`validate`) and raises :class:`DataError` on bad input.
    """

    projections: np.ndarray
    geometry: Geometry
    counts: np.ndarray | None = None
    flat: np.ndarray | None = None
    dark: np.ndarray | None = None
    reference: np.ndarray | None = None
    noise_std: float | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.geometry, Geometry):
            raise DataError(f"geometry must be a dipuq.geometry.Geometry, got {type(self.geometry).__name__}")
        self.projections = _as_f32(self.projections, "projections")
        for key in ("counts", "flat", "dark", "reference"):
            if getattr(self, key) is not None:
                setattr(self, key, _as_f32(getattr(self, key), key))
        if self.noise_std is not None:
            self.noise_std = float(self.noise_std)
        self.meta = dict(self.meta or {})
        self.validate()

    # -- derived ------------------------------------------------------------------------
    @property
    def angles(self) -> np.ndarray:
        """Projection angles in radians, ``(angles,)``."""
        return self.geometry.angles

    @property
    def ndim(self) -> int:
        """2 for a 2D scan (sinogram), 3 for a 3D scan."""
        return self.geometry.ndim

    @property
    def has_raw(self) -> bool:
        """Whether raw counts with flat and dark fields are attached."""
        return self.counts is not None

    # -- checks -------------------------------------------------------------------------
    def validate(self) -> Scan:
        """Check shapes and values against the geometry; raise a one-line :class:`DataError`.

        Checked: projections are finite and of shape ``geometry.proj_shape`` (angle count
        separately); counts, flat and dark come together, have the right shapes, are finite,
        non-negative, and positive with ``flat > dark`` except at a few dead pixels (at most
        :data:`MAX_BAD_FRACTION`); ``reference`` has shape ``geometry.vol_shape``;
        ``noise_std`` is finite and positive.
        """
        g, p = self.geometry, self.projections
        if p.ndim != len(g.proj_shape):
            raise DataError(f"projections have {p.ndim} dimensions {p.shape}, but a {g.ndim}D geometry "
                            f"needs {len(g.proj_shape)} {_layout(g)}")
        if p.shape[0] != g.n_angles:
            raise DataError(f"angle count mismatch: projections have {p.shape[0]} angles, geometry has {g.n_angles}")
        if p.shape != g.proj_shape:
            raise DataError(f"projection shape {p.shape} does not match the geometry's {g.proj_shape} {_layout(g)}")
        _check_finite(p, "projections")
        missed = g.angles_missing_volume()
        if len(missed):
            raise DataError(f"no detector ray passes through the volume at {len(missed)} of {g.n_angles} angles "
                            f"(cor_offset {g.cor_offset:g} px, volume {g.vol_shape} @ voxel {g.voxel_size:g}): "
                            "check cor_offset, the detector spacing / vectors and the volume size")
        raw = [k for k in ("counts", "flat", "dark") if getattr(self, k) is not None]
        if raw and len(raw) != 3:
            missing = sorted({"counts", "flat", "dark"} - set(raw))
            raise DataError(f"raw data need counts, flat and dark together; missing {', '.join(missing)}")
        if raw:
            if self.counts.shape != p.shape:
                raise DataError(f"counts shape {self.counts.shape} does not match projections {p.shape}")
            for key in ("flat", "dark"):
                a = getattr(self, key)
                if a.shape != g.det_shape:
                    raise DataError(f"{key} field shape {a.shape} does not match the detector {g.det_shape}")
            for key in ("counts", "flat", "dark"):
                _check_finite(getattr(self, key), key)
                if np.any(getattr(self, key) < 0):
                    raise DataError(f"{key} contain negative values: raw counts must be >= 0")
            check_flat_dark(self.flat, self.dark)
            bad = float(np.mean(self.counts <= 0))
            if bad > MAX_BAD_FRACTION:
                raise DataError(f"counts must be positive: {bad:.1%} of them are <= 0 "
                                f"(at most {MAX_BAD_FRACTION:.0%} dead pixels are tolerated)")
        if self.reference is not None:
            if self.reference.shape != g.vol_shape:
                raise DataError(f"reference volume shape {self.reference.shape} does not match the "
                                f"geometry's volume {g.vol_shape}")
            _check_finite(self.reference, "reference")
        if self.noise_std is not None and not (np.isfinite(self.noise_std) and self.noise_std > 0):
            raise DataError(f"noise_std must be finite and > 0, got {self.noise_std}")
        return self

    # -- transforms ---------------------------------------------------------------------
    def replace(self, **changes) -> Scan:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def slice(self, row: int) -> Scan:
        """The 2D parallel-beam scan of one detector row of a 3D parallel-beam scan.

        Each detector row of a 3D parallel scan is the sinogram of one axial slice ``z``. The
        reference slice is kept when the row maps onto a voxel layer (same spacing).

        Example: ``scan3d.slice(64).projections.shape == (angles, cols)``.
        """
        g = self.geometry
        if g.ndim != 3 or g.beam != "parallel" or g.is_vector:
            raise DataError(f"slice() needs a 3D parallel-beam (non-vector) scan, got {g.describe()}")
        rows = g.det_shape[0]
        if not -rows <= row < rows:
            raise DataError(f"row {row} is outside the detector's {rows} rows")
        row = row % rows
        g2 = Geometry("parallel", g.angles, g.vol_shape[1:], g.det_shape[1:], voxel_size=g.voxel_size,
                      det_spacing=g.det_spacing[1:], cor_offset=g.cor_offset)
        ref = None
        if self.reference is not None:
            z = (row - (rows - 1) / 2) * g.det_spacing[0] / g.voxel_size + (g.vol_shape[0] - 1) / 2
            k = int(round(z))
            if abs(z - k) < 1e-6 and 0 <= k < g.vol_shape[0]:
                ref = self.reference[k]
        raw = {}
        if self.has_raw:
            raw = dict(counts=self.counts[:, row], flat=self.flat[row], dark=self.dark[row])
        meta = {**self.meta, "slice_row": row}
        return Scan(self.projections[:, row], g2, reference=ref, noise_std=self.noise_std,
                    name=f"{self.name}[row {row}]" if self.name else f"row {row}", meta=meta, **raw)

    # -- serialisation ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the NPZ scan format (``docs/scan-format.md``) atomically (temp file + rename).

        With raw data, ``projections`` holds the counts and ``flat``/``dark`` the fields, so
        loading re-applies flat/dark correction and ``-log`` (with the stored clip floor).
        """
        path = Path(path)
        if path.suffix != ".npz":
            raise DataError(f"scan files end in .npz, got {path.name}")
        g = self.geometry
        arrays: dict[str, np.ndarray] = {
            "projections": self.counts if self.has_raw else self.projections,
            "angles": g.angles,
            "geometry": np.array(g.beam),
            "volume_shape": np.array(g.vol_shape, dtype=np.int64),
            "det_spacing": np.array(g.det_spacing, dtype=np.float64),
            "voxel_size": np.array(g.voxel_size, dtype=np.float64),
            "cor_offset": np.array(g.cor_offset, dtype=np.float64),
            "name": np.array(self.name),
            "meta": np.array(json.dumps(self.meta, default=_json_default)),
        }
        if g.source_origin is not None:
            arrays["source_origin"] = np.array(g.source_origin, dtype=np.float64)
            arrays["origin_detector"] = np.array(g.origin_detector, dtype=np.float64)
        if g.is_vector:
            arrays["vectors"] = g.vectors
            arrays["det_shape"] = np.array(g.det_shape, dtype=np.int64)
        if self.has_raw:
            arrays["flat"], arrays["dark"] = self.flat, self.dark
        if self.reference is not None:
            arrays["reference"] = self.reference
        if self.noise_std is not None:
            arrays["noise_std"] = np.array(self.noise_std, dtype=np.float64)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, floor: float | None = None) -> Scan:
        """Read an NPZ scan file (``docs/scan-format.md``); raw counts are converted to line integrals."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except MemoryError:
            raise DataError(f"{path}: its arrays do not fit in memory") from None
        except Exception as exc:  # noqa: BLE001 - zipfile, zlib, EOF, pickle and format errors alike
            raise DataError(f"{path} is truncated or corrupt, not a readable .npz scan file "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
        return cls.from_arrays(d, source=str(path), floor=floor)

    @classmethod
    def from_arrays(cls, d: dict, *, source: str = "arrays", floor: float | None = None) -> Scan:
        """Build a scan from a dict with the NPZ scan-format keys (see :meth:`load`)."""
        d = dict(d)
        unknown = set(d) - _NPZ_KEYS
        if unknown:
            raise DataError(f"{source}: unknown keys {', '.join(sorted(unknown))} "
                            f"(allowed: {', '.join(sorted(_NPZ_KEYS))})")
        for key in ("projections", "geometry", "volume_shape"):
            if key not in d:
                raise DataError(f"{source}: missing key {key!r}")
        try:
            meta = json.loads(str(d["meta"])) if "meta" in d else {}
        except ValueError:
            raise DataError(f"{source}: 'meta' is not valid JSON") from None
        if not isinstance(meta, dict):
            raise DataError(f"{source}: 'meta' must be a JSON object, got {type(meta).__name__}")
        p = np.asarray(d["projections"])
        beam = str(d["geometry"])
        if beam not in BEAMS:
            raise DataError(f"{source}: unknown geometry {beam!r}: expected one of {', '.join(BEAMS)}")
        if "angles" in d and "angles_deg" in d:
            raise DataError(f"{source}: give either 'angles' (radians) or 'angles_deg', not both")
        if "angles" in d:
            angles = _numeric(d["angles"], "angles", source)
            _check_radians(angles, source, vector="vectors" in d)
        elif "angles_deg" in d:
            angles = np.deg2rad(_numeric(d["angles_deg"], "angles_deg", source))
        elif "vectors" in d:
            angles = np.arange(len(d["vectors"]), dtype=np.float64)
        else:
            raise DataError(f"{source}: missing key 'angles' (radians) or 'angles_deg'")
        vol_shape = _shape(d["volume_shape"], "volume_shape", source)
        if p.ndim != len(vol_shape):
            layout = "(angles, cols)" if len(vol_shape) == 2 else "(angles, rows, cols)"
            raise DataError(f"{source}: projections have {p.ndim} dimensions {p.shape}, but a {len(vol_shape)}D "
                            f"volume_shape {vol_shape} needs {layout}")
        det_shape = _shape(d["det_shape"], "det_shape", source) if "det_shape" in d \
            else tuple(p.shape[1:])
        kw = {}
        for key in ("voxel_size", "source_origin", "origin_detector", "cor_offset"):
            if key in d:
                v = _numeric(d[key], key, source)
                if v.size != 1 or not np.isfinite(v).all():
                    raise DataError(f"{source}: {key!r} must be one finite number, got {d[key]!r}")
                kw[key] = float(v.reshape(-1)[0])
        if "det_spacing" in d:
            kw["det_spacing"] = tuple(_numeric(d["det_spacing"], "det_spacing", source).reshape(-1))
        if "vectors" in d:
            kw["vectors"] = _numeric(d["vectors"], "vectors", source)
        try:
            geometry = Geometry(beam, angles, vol_shape, det_shape, **kw)
        except ValueError as exc:
            raise DataError(f"{source}: {exc}") from None
        raw = {}
        if "flat" in d or "dark" in d:
            if "flat" not in d or "dark" not in d:
                raise DataError(f"{source}: raw projections need both 'flat' and 'dark'")
            flat = _average_fields(d["flat"], geometry.det_shape, "flat")
            dark = _average_fields(d["dark"], geometry.det_shape, "dark")
            floor = floor if floor is not None else float(meta.get("floor", DEFAULT_FLOOR))
            counts = _as_f32(p, "projections")
            check_raw_shapes(counts, flat, dark, geometry)
            raw = dict(counts=counts, flat=flat, dark=dark)
            p = line_integrals(counts, flat, dark, floor=floor)
            meta["floor"] = floor
        noise = float(_numeric(d["noise_std"], "noise_std", source).reshape(-1)[0]) if "noise_std" in d else None
        return cls(p, geometry, reference=d.get("reference"), noise_std=noise,
                   name=str(d.get("name", "")), meta=meta, **raw)


_NPZ_KEYS = {"projections", "angles", "angles_deg", "geometry", "volume_shape", "det_spacing", "voxel_size",
             "source_origin", "origin_detector", "cor_offset", "flat", "dark", "reference", "noise_std",
             "name", "meta", "vectors", "det_shape"}


#: Largest span of ``angles`` accepted as radians: one full turn plus a little slack (the last
#: angle of a 0..2π scan sometimes equals 2π, and float round-off). More looks like degrees.
MAX_RADIANS_SPAN = 2 * np.pi + 1e-3


def _check_radians(angles: np.ndarray, source: str, vector: bool = False) -> None:
    """Refuse radian angles that look like degrees (a span beyond one turn, e.g. 0..165)."""
    if vector or angles.size == 0 or not np.isfinite(angles).all():
        return
    span = float(angles.max() - min(angles.min(), 0.0))
    if span > MAX_RADIANS_SPAN:
        raise DataError(f"{source}: 'angles' span {span:.4g} rad (more than one turn, 2π ≈ 6.283): they look like "
                        f"degrees (max {float(angles.max()):.4g}); store them as 'angles_deg' instead, or convert "
                        "with numpy.deg2rad")


def _numeric(a, key: str, source: str) -> np.ndarray:
    """``a`` as float64, or a one-line DataError naming ``key``."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise DataError(f"{source}: {key!r} must be numeric, got {a.dtype} value {_short(a)}")
    return a.astype(np.float64)


def _shape(a, key: str, source: str) -> tuple[int, ...]:
    """A shape from an integer array, or a one-line DataError naming ``key`` (strings, 32.5, -1)."""
    v = _numeric(a, key, source).reshape(-1)
    if v.size == 0 or not np.isfinite(v).all() or np.any(v != np.round(v)) or np.any(v < 1):
        raise DataError(f"{source}: {key!r} must be positive whole numbers, got {_short(np.asarray(a))}")
    return tuple(int(n) for n in v)


def _short(a: np.ndarray) -> str:
    text = " ".join(repr(a.tolist() if a.ndim else a.item()).split())
    return text if len(text) <= 60 else text[:57] + "..."


def line_integrals(counts, flat, dark, *, floor: float = DEFAULT_FLOOR) -> np.ndarray:
    """Flat/dark-corrected line integrals ``-log(max((P - D) / (F - D), floor))``, float32.

    Beer–Lambert with counts ``P``, flat (open beam) ``F`` and dark ``D``. The transmission ratio
    is clipped below at ``floor`` (default 1e-3, so ``y <= 6.9``): photon-starved or noisy pixels
    where ``P <= D`` would otherwise give ``+inf``. Dead pixels (``F <= D``) carry no information.

    Parameters
    ----------
    counts : raw counts ``P``, (angles, *det_shape)
    flat, dark : fields ``F``, ``D`` of detector shape ``det_shape`` (already averaged)
    floor : lower clip of the transmission ratio, in (0, 1); line integrals are at most ``-log(floor)``

    Dead pixels are filled by linear interpolation from the live pixels of their detector row.

    Example::

        >>> y = line_integrals(np.array([[50.0, 100.0]]), np.array([110.0, 110.0]), np.array([10.0, 10.0]))
        >>> np.round(y, 4)   # -log(40/100), -log(90/100)
        array([[0.9163, 0.1054]], dtype=float32)
    """
    if not 0 < floor < 1:
        raise DataError(f"floor must lie in (0, 1), got {floor}")
    P = np.asarray(counts, dtype=np.float64)  # shape: (angles, *det)
    F, D = np.asarray(flat, dtype=np.float64), np.asarray(dark, dtype=np.float64)  # shape: det
    if F.shape != P.shape[1:] or D.shape != P.shape[1:]:
        raise DataError(f"flat {F.shape} and dark {D.shape} must match the detector shape {P.shape[1:]}")
    dead = ~(F > D)  # shape: det
    ratio = (P - D) / np.where(dead, 1.0, F - D)
    y = -np.log(np.maximum(ratio, floor))
    if dead.any():
        y = _fill_dead(y, dead)
    return y.astype(np.float32)


def _fill_dead(y: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """Interpolate ``y[..., dead]`` along the last (column) axis from live pixels of the same row."""
    y2 = y.reshape(y.shape[0], -1, y.shape[-1])  # shape: (angles, rows, cols)
    dead2 = dead.reshape(-1, dead.shape[-1])  # shape: (rows, cols)
    cols = np.arange(dead2.shape[1])
    for r in np.flatnonzero(dead2.any(axis=1)):
        live = ~dead2[r]
        if not live.any():
            y2[:, r, :] = 0.0
            continue
        for a in range(y2.shape[0]):
            y2[a, r, ~live] = np.interp(cols[~live], cols[live], y2[a, r, live])
    return y2.reshape(y.shape)


def check_flat_dark(flat: np.ndarray, dark: np.ndarray) -> None:
    """Raise :class:`DataError` unless ``flat > dark`` at all but a few dead pixels."""
    bad = float(np.mean(flat <= dark))
    if bad > MAX_BAD_FRACTION:
        raise DataError(f"flat field must exceed the dark field: flat <= dark at {bad:.1%} of pixels "
                        f"(swapped files? at most {MAX_BAD_FRACTION:.0%} dead pixels are tolerated)")


def check_raw_shapes(counts: np.ndarray, flat: np.ndarray, dark: np.ndarray, geometry: Geometry) -> None:
    """Raise :class:`DataError` if raw counts / fields do not fit the geometry."""
    if counts.shape != geometry.proj_shape:
        raise DataError(f"raw projection shape {counts.shape} does not match the geometry's {geometry.proj_shape}")
    for key, a in (("flat", flat), ("dark", dark)):
        if a.shape != geometry.det_shape:
            raise DataError(f"{key} field shape {a.shape} does not match the detector {geometry.det_shape}")


def _average_fields(a, det_shape: tuple[int, ...], key: str) -> np.ndarray:
    """A flat/dark field: ``det_shape`` as is, or a stack ``(n, *det_shape)`` averaged over n."""
    a = _as_f32(a, key)
    if a.shape == tuple(det_shape):
        return a
    if a.ndim == len(det_shape) + 1 and a.shape[1:] == tuple(det_shape):
        return a.mean(axis=0, dtype=np.float64).astype(np.float32)
    raise DataError(f"{key} field shape {a.shape} does not match the detector {tuple(det_shape)} "
                    f"(or a stack (n, {', '.join(map(str, det_shape))}))")


def _as_f32(a, key: str) -> np.ndarray:
    try:
        a = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)
    except Exception:  # noqa: BLE001 - report any conversion failure as bad data
        raise DataError(f"{key} is not an array") from None
    if a.dtype.kind not in "biuf":
        raise DataError(f"{key} must be numeric, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_finite(a: np.ndarray, key: str) -> None:
    if not np.all(np.isfinite(a)):
        n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        raise DataError(f"{key} contain non-finite values ({n_nan} NaN, {n_inf} inf)")


def _layout(g: Geometry) -> str:
    return "(angles, cols)" if g.ndim == 2 else "(angles, rows, cols)"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"meta value of type {type(o).__name__} is not JSON-serialisable")
