"""Figures: orthogonal slices of reconstruction / std / |error| / z-score and diagnostics.

This is the only dipuq module that imports matplotlib. It uses the object-oriented API on the
Agg canvas (``matplotlib.figure.Figure``), never ``pyplot``: no window ever opens and no global
backend is switched, with or without a display.

Quantities shown (``x̂`` reconstruction, ``σ`` posterior std, ``x_ref`` reference):

- ``σ`` and ``|error| = |x̂ - x_ref|`` each on their own scale from 0 (σ is often much smaller
  or larger than the error; one shared scale would hide the structure of one of them — whether
  the error is inside its error bar is what the z-score shows); reconstruction and reference
  share one grey scale;
- ``z = (x̂ - x_ref) / σ`` on a diverging map symmetric about 0 (±3 by default): calibrated error
  bars give z ~ N(0, 1), mostly pale, with few saturated voxels;
- the reliability diagram: empirical coverage of central Gaussian intervals ``x̂ ± q σ`` against
  their nominal level; on the diagonal = calibrated, below = over-confident (σ too small);
- ``σ`` against ``|error|`` (hexbin, log-log): good error bars put mass along the diagonal.

Slices of a volume ``(z, y, x)``: axial = fixed z (image y × x), coronal = fixed y (z × x),
sagittal = fixed x (z × y). Images are drawn as arrays (row 0 at the top), voxels square.
The maps, colour scales and slices come from :mod:`dipuq.show.prepare` (numpy only).

Example::

    >>> fig = orthoslices({"recon": x, "std": s, "reference": ref})
    >>> save_figure(fig, "figures/slices.png")
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.cm
import matplotlib.image
import matplotlib.ticker
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from dipuq._io import atomic_write_bytes
from dipuq.show.prepare import AXES, QUANTITIES, derived_maps, display_scales, take_slice

__all__ = [
    "coverage_map",
    "orthoslices",
    "reliability_diagram",
    "std_error_hexbin",
    "loss_curve",
    "curves_figure",
    "em_trace",
    "save_figure",
    "figure_png",
    "array_png",
    "colorbar_png",
]

_AXIS_DIMS = {"z": ("y", "x"), "y": ("z", "x"), "x": ("z", "y")}


# -------------------------------------------------------------------------------------------
# Figures
# -------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def orthoslices(
    maps: Mapping[str, np.ndarray],
    *,
    axes: Sequence[str] = ("z", "y", "x"),
    indices: Mapping[str, int] | None = None,
    zscore_limit: float = 3.0,
    title: str | None = None,
    voxel_size: float | None = None,
) -> Figure:
    """A grid of slices: one row per view (axial / coronal / sagittal; one row for 2D), one column
    per quantity in ``maps`` (keys of :data:`QUANTITIES`, e.g. from :func:`derived_maps`), one
    shared colour bar per column.

    ``indices`` maps an axis to its slice (default: the middle). Pass either raw arrays
    (``{"recon": x, "std": s, "reference": r}``; |error| and z are derived) or derived maps.
    """
    maps = dict(maps)
    if "reference" in maps and "abs_error" not in maps:
        maps = derived_maps(maps["recon"], maps["std"], maps["reference"])
    names = [k for k in QUANTITIES if k in maps]
    shape = maps[names[0]].shape
    is3d = len(shape) == 3
    views = list(axes) if is3d else ["z"]
    indices = dict(indices or {})
    for a in views:
        indices.setdefault(a, shape["zyx".index(a)] // 2 if is3d else 0)
    scales = display_scales(maps, zscore_limit)

    def extent(a):  # (width, height) of a slice in voxels
        if not is3d:
            return shape[1], shape[0]
        h, w = (shape["zyx".index(d)] for d in _AXIS_DIMS[a])
        return w, h

    panel_w = 2.35
    heights = [extent(a)[1] / extent(a)[0] for a in views]
    fig = _new_figure(panel_w * len(names) + 0.9, panel_w * sum(heights) + 0.75 + 0.15 * len(views) + (0.35 if title else 0))
    grid = fig.add_gridspec(len(views) + 1, len(names), height_ratios=[*heights, 0.07])
    for r, a in enumerate(views):
        for c, name in enumerate(names):
            ax = fig.add_subplot(grid[r, c])
            img = take_slice(maps[name], a, indices[a])
            vmin, vmax = scales[name]
            im = ax.imshow(img, cmap=QUANTITIES[name][1], vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(QUANTITIES[name][0], fontsize=10)
            if c == 0:
                dy, dx = _AXIS_DIMS[a] if is3d else ("y", "x")
                label = f"{AXES[a]}  ({a} = {indices[a]})\n{dy} ↓  {dx} →" if is3d else f"{dy} ↓  {dx} →"
                ax.set_ylabel(label, fontsize=9)
            if r == len(views) - 1:
                cax = fig.add_subplot(grid[-1, c])
                cb = fig.colorbar(im, cax=cax, orientation="horizontal",
                                  extend="both" if name == "zscore" else ("max" if name in ("std", "abs_error") else "neither"))
                cb.ax.tick_params(labelsize=8)
                cb.locator = matplotlib.ticker.MaxNLocator(4)
                cb.update_ticks()
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def reliability_diagram(
    nominal, empirical, *, labels: Sequence[str] | None = None, title: str = "Calibration of the error bars",
    ylabel: str = "fraction of voxels with x_ref inside",
) -> Figure:
    """Empirical vs nominal coverage of central intervals ``x̂ ± q σ``; the diagonal is perfect
    calibration. ``nominal``/``empirical`` may be 1D (one method) or lists of 1D (several)."""
    fig = _new_figure(4.4, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="perfectly calibrated")
    ax.fill_between([0, 1], [0, 0], [0, 1], color="tab:red", alpha=0.06, lw=0)
    ax.fill_between([0, 1], [0, 1], [1, 1], color="tab:blue", alpha=0.06, lw=0)
    box = {"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1.5}
    ax.text(0.97, 0.03, "over-confident\n(σ too small)", ha="right", va="bottom", fontsize=8, color="tab:red", bbox=box)
    ax.text(0.55, 0.97, "under-confident (σ too large)", ha="center", va="top", fontsize=8, color="tab:blue", bbox=box)
    if np.ndim(nominal[0]) == 0:
        nominal, empirical = [nominal], [empirical]
    labels = list(labels) if labels else [None] * len(nominal)
    for n, e, lab in zip(nominal, empirical, labels):
        ax.plot(n, e, marker="o", ms=3, lw=1.6, label=lab or "dipuq")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal coverage of x̂ ± qσ")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 0.13), fontsize=8, framealpha=0.8)
    return fig


def coverage_map(cover: np.ndarray) -> Figure:
    """The share of projection angles whose rays reach each voxel (central slices of a volume):
    1 is the region every angle sees, where the metrics are computed."""
    cover = np.asarray(cover, dtype=np.float64)
    views = [cover] if cover.ndim == 2 else [cover[cover.shape[0] // 2], cover[:, cover.shape[1] // 2],
                                               cover[:, :, cover.shape[2] // 2]]
    names = ["image"] if cover.ndim == 2 else ["axial", "coronal", "sagittal"]
    fig = _new_figure(3.4 * len(views) + 0.8, 3.4)
    axes = fig.subplots(1, len(views), squeeze=False)[0]
    for ax, v, name in zip(axes, views, names):
        im = ax.imshow(v, cmap="viridis", vmin=0, vmax=1, origin="upper")
        ax.contour(v >= 0.999, levels=[0.5], colors="white", linewidths=1.0)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.85, label="share of angles that see the voxel")
    fig.suptitle(f"Ray coverage: {float((cover >= 0.999).mean()):.0%} of voxels seen by every angle (white outline)",
                 fontsize=10)
    return fig


def std_error_hexbin(std, abs_error, *, spearman: float | None = None, gridsize: int = 45) -> Figure:
    """Per-voxel ``|error|`` against ``σ`` (log-log hexbin of voxel counts) with the line ``|error| = σ``."""
    s = np.asarray(std, dtype=np.float64).ravel()
    e = np.asarray(abs_error, dtype=np.float64).ravel()
    ok = np.isfinite(s) & np.isfinite(e) & (s > 0) & (e > 0)
    s, e = s[ok], e[ok]
    fig = _new_figure(4.8, 4.2)
    ax = fig.add_subplot()
    if s.size:
        lo = max(min(np.percentile(s, 0.1), np.percentile(e, 1)), 1e-12)
        hi = max(np.percentile(s, 99.9), np.percentile(e, 99.9))
        lo, hi = lo / 1.5, hi * 1.5
        hb = ax.hexbin(s, e, gridsize=gridsize, xscale="log", yscale="log", bins="log", cmap="viridis", mincnt=1,
                       extent=(math.log10(lo), math.log10(hi), math.log10(lo), math.log10(hi)))
        fig.colorbar(hb, ax=ax, label="voxels per bin")
        ax.plot([lo, hi], [lo, hi], color="w", lw=2.2)
        ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--", label="|error| = σ")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("posterior std σ")
    ax.set_ylabel("|error| = |x̂ − x_ref|")
    title = "Do larger error bars mark larger errors?"
    if spearman is not None and np.isfinite(spearman):
        title += f"\nSpearman ρ(σ, |error|) = {spearman:.2f}"
    ax.set_title(title, fontsize=10)
    return fig


def loss_curve(
    iterations,
    loss,
    *,
    psnr: tuple[Sequence[float], Sequence[float]] | None = None,
    best_iteration: int | None = None,
    noise_level: float | None = None,
    heldout: Sequence[float] | None = None,
    ylabel: str = "data misfit (1/m)||A f(θ) − y||²",
    title: str = "Deep image prior fit",
) -> Figure:
    """A training curve against Adam iteration (log scale): the data misfit by default, with
    optionally ``psnr = (iterations, values)`` against the reference (right axis), the kept
    iterate θ* and the noise level (the misfit that noise alone produces, σ²); ``heldout`` is the
    misfit on the held-out angles that the validation stop watches."""
    it = np.asarray(iterations)
    fig = _new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    ax.plot(it, np.asarray(loss), color="tab:blue", lw=1.4, label="misfit (fitted angles)")
    if heldout is not None and len(heldout):
        ax.plot(it[: len(heldout)], np.asarray(heldout), color="tab:green", lw=1.4,
                label="held-out angles (stop rule)")
    ax.set_yscale("log")
    ax.set_xlabel("Adam iteration")
    ax.set_ylabel(ylabel if heldout is None else "data misfit per measurement", color="tab:blue")
    if noise_level is not None and noise_level > 0:
        ax.axhline(noise_level, color="tab:blue", ls=":", lw=1.2, label="noise level σ²")
    if best_iteration is not None and best_iteration >= 0:
        ax.axvline(best_iteration, color="k", ls="--", lw=1, label=f"kept iterate θ* ({best_iteration})")
    handles, labels = ax.get_legend_handles_labels()
    if psnr is not None and len(psnr[0]):
        ax2 = ax.twinx()
        ax2.plot(np.asarray(psnr[0]), np.asarray(psnr[1]), color="tab:orange", lw=1.4, label="PSNR vs reference")
        ax2.set_ylabel("PSNR of f(θ) vs reference [dB]", color="tab:orange")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=min(3, len(labels)), frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=11)
    return fig


def curves_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = True,
) -> Figure:
    """Several named ``(x, y)`` curves on one axis (e.g. sampler objective per step)."""
    fig = _new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    for name, (x, y) in curves.items():
        y = np.asarray(y, dtype=np.float64)
        ax.plot(np.asarray(x), y, lw=1.4, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return fig


def em_trace(g, *, gamma=None, title: str = "EM for the prior variance g") -> Figure:
    """Prior variance ``g`` after each EM round (log scale), optionally the effective dimension γ̂."""
    g = np.asarray(g, dtype=np.float64)
    fig = _new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    ax.plot(np.arange(len(g)), g, marker="o", color="tab:purple", lw=1.4, label="g")
    ax.set_yscale("log")
    ax.set_xlabel("EM round (0 = initial value)")
    ax.set_ylabel("prior variance g", color="tab:purple")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if gamma is not None and len(gamma):
        ax2 = ax.twinx()
        gm = np.asarray(gamma, dtype=np.float64)
        ax2.plot(np.arange(1, len(gm) + 1), gm, marker="s", color="tab:green", lw=1.2)
        ax2.set_ylabel("effective dimension γ̂", color="tab:green")
    ax.set_title(title, fontsize=11)
    return fig


# -------------------------------------------------------------------------------------------
# Output
# -------------------------------------------------------------------------------------------


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure as a PNG atomically and return the path."""
    return atomic_write_bytes(path, figure_png(fig, dpi))


def array_png(image: np.ndarray, cmap: str, vmin: float, vmax: float) -> bytes:
    """A 2D array rendered pixel-for-pixel through a colormap, as PNG bytes (no axes)."""
    img = np.asarray(image, dtype=np.float64)
    rgba = matplotlib.colormaps[cmap](Normalize(vmin, vmax, clip=True)(img), bytes=True)
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, rgba, format="png")
    return buf.getvalue()


def colorbar_png(cmap: str, vmin: float, vmax: float, label: str = "", *, width: float = 2.4, log: bool = False) -> bytes:
    """A horizontal colour bar with ticks and a label, as PNG bytes."""
    fig = Figure(figsize=(width, 0.62))
    FigureCanvasAgg(fig)
    cax = fig.add_axes((0.06, 0.62, 0.88, 0.3))
    norm = LogNorm(vmin, vmax) if log else Normalize(vmin, vmax)
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cb.locator = matplotlib.ticker.MaxNLocator(4)
    cb.update_ticks()
    cb.ax.tick_params(labelsize=7, length=2, pad=1)
    if label:
        cb.set_label(label, fontsize=7, labelpad=1)
    return figure_png(fig, dpi=110)


# --- experiments (issue 6) ---


def method_comparison(
    recons: Mapping[str, np.ndarray],
    stds: Mapping[str, np.ndarray | None],
    reference: np.ndarray,
    *,
    title: str | None = None,
    panel: float = 1.75,
) -> Figure:
    """The same 2D slice for several methods side by side: reconstruction, std σ and |error|.

    Columns: the reference, then one per method (``recons`` order). Rows: reconstruction (one
    grey scale, the reference's 0.5–99.5 % range), posterior std σ and |x̂ − x_ref| (one shared
    magma scale, so a column whose σ looks like its |error| has honest error bars). Methods
    without a std (point estimates) leave the σ panel blank.
    """
    names = list(recons)
    ref = np.asarray(reference, dtype=np.float64)
    errs = {n: np.abs(np.asarray(recons[n], dtype=np.float64) - ref) for n in names}
    lo, hi = np.percentile(ref, [0.5, 99.5])
    pool = [e.ravel() for e in errs.values()] + [np.asarray(s).ravel() for s in stds.values() if s is not None]
    emax = float(np.percentile(np.concatenate(pool), 99.0)) if pool else 1.0
    emax = emax if emax > 0 else 1.0
    h, w = ref.shape
    ncol = len(names) + 1
    fig = _new_figure(panel * ncol + 0.6, panel * 3 * h / w + 1.0 + (0.3 if title else 0))
    grid = fig.add_gridspec(3, ncol + 1, width_ratios=[1] * ncol + [0.06])
    rows = ("reconstruction", "std σ", "|error|")
    ims = [None, None, None]
    for c in range(ncol):
        name = "reference" if c == 0 else names[c - 1]
        for r in range(3):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and r > 0:
                ax.axis("off")
                continue
            if r == 0:
                img, cmap, vmin, vmax = (ref if c == 0 else recons[name]), "gray", lo, hi
                ax.set_title(name, fontsize=8)
            elif r == 1:
                s = stds.get(name)
                if s is None:
                    ax.text(0.5, 0.5, "no std\n(point estimate)", ha="center", va="center", fontsize=7,
                            transform=ax.transAxes, color="0.4")
                    continue
                img, cmap, vmin, vmax = s, "magma", 0.0, emax
            else:
                img, cmap, vmin, vmax = errs[name], "magma", 0.0, emax
            im = ax.imshow(np.asarray(img), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ims[r] = im
            if (c == 1 and r > 0) or (c == 0 and r == 0):
                ax.set_ylabel(rows[r], fontsize=8)
    for r in range(3):
        if ims[r] is not None:
            cb = fig.colorbar(ims[r], cax=fig.add_subplot(grid[r, -1]))
            cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
