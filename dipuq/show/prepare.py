"""What the figures and the report show, computed with numpy only: derived maps, colour scales, slices.

- :func:`derived_maps`: from the reconstruction ``x̂``, the posterior std ``σ`` and (if known) the
  reference ``x_ref``, the maps shown side by side — ``|error| = |x̂ - x_ref|`` and the z-score
  ``z = (x̂ - x_ref) / σ`` — all float32 of the volume's shape;
- :func:`display_scales`: one colour range per quantity, fixed over all slices;
- :func:`take_slice` / :func:`slice_indices`: slices of a ``(z, y, x)`` volume (axial = fixed z,
  coronal = fixed y, sagittal = fixed x) and which of them to show;
- :func:`coverage_curve`: the reliability diagram's data (empirical against nominal coverage).

:mod:`dipuq.show.viz` draws these with matplotlib; :mod:`dipuq.show.report` embeds them in HTML.

Example::

    >>> maps = derived_maps(x, s, ref)           # {recon, reference, std, abs_error, zscore}
    >>> scales = display_scales(maps)            # {name: (vmin, vmax)}
    >>> take_slice(maps["zscore"], "z", 10).shape
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dipuq.maps.calibration import interval_multiplier

__all__ = ["AXES", "QUANTITIES", "derived_maps", "display_scales", "take_slice", "slice_indices", "coverage_curve"]

AXES = {"z": "axial", "y": "coronal", "x": "sagittal"}
# name -> (panel title, colormap); scales are computed by display_scales
QUANTITIES = {
    "recon": ("Reconstruction x̂", "gray"),
    "reference": ("Reference x_ref", "gray"),
    "std": ("Posterior std σ", "magma"),
    "abs_error": ("|error| = |x̂ − x_ref|", "magma"),
    "zscore": ("z-score (x̂ − x_ref)/σ", "RdBu_r"),
}


def derived_maps(recon, std, reference=None) -> dict[str, np.ndarray]:
    """``{recon, std[, reference, abs_error, zscore]}`` as float32 arrays of the volume's shape."""
    recon = np.asarray(recon, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    if std.shape != recon.shape:
        raise ValueError(f"std shape {std.shape} differs from recon shape {recon.shape}")
    out = {"recon": recon}
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float32)
        if reference.shape != recon.shape:
            raise ValueError(f"reference shape {reference.shape} differs from recon shape {recon.shape}")
        err = recon - reference
        out["reference"] = reference
        out["std"] = std
        out["abs_error"] = np.abs(err)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = err / np.maximum(std, np.finfo(np.float32).tiny)
        out["zscore"] = np.nan_to_num(z, nan=0.0, posinf=1e6, neginf=-1e6).astype(np.float32)
    else:
        out["std"] = std
    return out


def display_scales(maps: Mapping[str, np.ndarray], zscore_limit: float = 3.0) -> dict[str, tuple[float, float]]:
    """Colour limits: recon & reference share robust grey limits (0.5–99.5 %), std and |error| are
    each ``[0, 99.5 %]``, z-score is ``±zscore_limit``."""
    def pct(arrays, lo, hi):
        v = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
        v = v[np.isfinite(v)]
        if v.size == 0:
            return 0.0, 1.0
        a, b = np.percentile(v, [lo, hi])
        return float(a), float(b if b > a else a + max(abs(a), 1.0) * 1e-6)

    scales = {}
    grey = [maps[k] for k in ("reference", "recon") if k in maps]
    scales["recon"] = scales["reference"] = pct(grey, 0.5, 99.5)
    for k in ("std", "abs_error"):
        if k in maps:
            scales[k] = (0.0, max(pct([maps[k]], 0.0, 99.5)[1], 1e-12))
    scales["zscore"] = (-float(zscore_limit), float(zscore_limit))
    return {k: v for k, v in scales.items() if k in maps}


def take_slice(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """The 2D slice of a ``(z, y, x)`` volume at ``index`` along ``axis`` (a 2D image is returned as is)."""
    volume = np.asarray(volume)
    if volume.ndim == 2:
        return volume
    k = "zyx".index(axis)
    return np.take(volume, index, axis=k)


def slice_indices(n: int, count: int) -> list[int]:
    """At most ``count`` evenly spaced slice indices in ``[0, n)``, always including the middle."""
    if n <= count:
        return list(range(n))
    idx = set(np.round(np.linspace(0, n - 1, count)).astype(int).tolist())
    idx.add(n // 2)
    while len(idx) > count:  # the middle pushed us one over: drop the neighbour of the middle
        near = sorted(idx - {n // 2}, key=lambda i: abs(i - n // 2))[0]
        idx.discard(near)
    return sorted(idx)


def coverage_curve(error, std, levels=None, df: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Empirical coverage of central intervals ``x̂ ± k(p) σ`` at nominal levels p: Gaussian
    (k = Φ⁻¹((1+p)/2)) or, with ``df``, Student-t scaled to standard deviation σ."""
    levels = np.linspace(0.05, 0.99, 48) if levels is None else np.asarray(levels, dtype=np.float64)
    e = np.abs(np.asarray(error, dtype=np.float64)).ravel()
    s = np.asarray(std, dtype=np.float64).ravel()
    q = np.array([interval_multiplier(float(lv), df) for lv in levels])
    ratio = np.sort(e / np.maximum(s, 1e-30))
    empirical = np.searchsorted(ratio, q, side="right") / ratio.size
    return levels, empirical
