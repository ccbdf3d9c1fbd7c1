"""Stages ``scan`` and ``fbp``: the preprocessed scan and its held-out split, the analytic
reconstruction, the data scale ``norm`` and the ray coverage; the operators and projections
later stages read (``A_all``, ``A`` of the fitted angles, ``A_H`` of the held-out ones, ``y``, ``y_H``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from dipuq._io import atomic_path, atomic_save_npy, atomic_write_json
from dipuq.data import preprocess
from dipuq.data.scan import Scan
from dipuq.data.split import ProjectionSplit
from dipuq.errors import ConfigError
from dipuq.memory import check_operator
from dipuq.operators import RayTransform, recon
from dipuq.operators.ray import BACKENDS, available_backends
from dipuq.run.context import RunContext, Stage

__all__ = ["SCAN", "FBP", "prepare_scan", "check_memory", "NORM_QUANTILE", "FULL_COVERAGE"]


def prepare_scan(scan: Scan, cfg) -> Scan:
    """Apply the ``[data]`` section: merge repeated angles, stripe filter, angle subsampling, crop, binning.

    Each step is the identity at its default (a scan without repeated angles is returned as is).
    """
    scan = preprocess.merge_repeated_angles(scan, cfg.repeated)
    if cfg.stripe != "none":
        if cfg.stripe_size % 2 == 0:
            raise ConfigError(f"data.stripe_size must be odd, got {cfg.stripe_size}")
        scan = preprocess.remove_stripes(scan, cfg.stripe, cfg.stripe_size)
    if cfg.angles:
        if cfg.angles > scan.geometry.n_angles:
            raise ConfigError(f"data.angles = {cfg.angles} but the scan has only {scan.geometry.n_angles} angles")
        scan = preprocess.subsample_angles(scan, cfg.angles)
    for key in ("crop_cols", "crop_rows"):
        if getattr(cfg, key) and len(getattr(cfg, key)) != 2:
            raise ConfigError(f"data.{key} must be [start, stop], got {getattr(cfg, key)}")
    if cfg.crop_cols or cfg.crop_rows or cfg.vol_xy:
        scan = preprocess.crop(scan, cols=tuple(cfg.crop_cols) or None, rows=tuple(cfg.crop_rows) or None,
                               vol_xy=cfg.vol_xy or None)
    if cfg.bin > 1:
        scan = preprocess.bin(scan, cfg.bin)
    return scan


#: The scan's scale (``norm``) is this quantile of |FBP of the fitted angles|: a robust "typical
#: bright voxel", so that every later stage works on an image of order one whatever the data's units.
NORM_QUANTILE = 0.995


#: A voxel is in the covered region (metrics, report) when rays of at least this share of the
#: angles reach it.
FULL_COVERAGE = 0.999


def check_memory(scan: Scan, backend: str, device: torch.device) -> None:
    """Refuse, before any work, a scan whose ray transform cannot fit in memory (one line)."""
    if backend == "auto":
        ok = [k for k in available_backends(scan.geometry) if device.type == "cuda" or not BACKENDS[k].requires_cuda]
        backend = ok[0] if ok else "cpu-cone"
    check_operator(scan.geometry, backend)


def _load_scan(ctx):
    return Scan.load(ctx.path("scan", "scan.npz"))


def _load_split(ctx):
    path = ctx.path("scan", "split.json")
    return ProjectionSplit.load(path) if path.exists() else ProjectionSplit.none(ctx["scan"].geometry.n_angles)


def _operator(ctx, geometry):
    return RayTransform(geometry, backend=ctx.config.operator.backend, device=ctx.device)


def _make_operator_all(ctx):
    return _operator(ctx, ctx["scan"].geometry)


def _make_operator(ctx):
    """A of the fit: the scan's geometry restricted to the fitted angles."""
    split = ctx["split"]
    if not split.has_heldout:
        return ctx["A_all"]
    return _operator(ctx, ctx["scan"].geometry.subset(np.asarray(split.fit)))


def _make_operator_heldout(ctx):
    split = ctx["split"]
    return _operator(ctx, ctx["scan"].geometry.subset(np.asarray(split.held))) if split.has_heldout else None


def _projections(ctx, part: str, A):
    """The ``part`` ("fit"/"held") projections in fit units (divided by the scan's scale ``norm``)."""
    idx = np.asarray(getattr(ctx["split"], part))
    y = ctx["scan"].projections[idx] / ctx["norm"]
    return torch.as_tensor(y, dtype=A.dtype, device=A.device)


def _load_y(ctx):
    return _projections(ctx, "fit", ctx["A"])


def _load_y_heldout(ctx):
    return _projections(ctx, "held", ctx["A_H"]) if ctx["split"].has_heldout else None


def _load_fbp(ctx):
    return torch.as_tensor(np.load(ctx.path("fbp", "fbp.npy")), device=ctx.device)


def _load_fbp_fit(ctx):
    path = ctx.path("fbp", "fbp_fit.npy")
    return torch.as_tensor(np.load(path), device=ctx.device) if path.exists() else ctx["fbp"]


def _load_norm(ctx):
    return float(json.loads(ctx.path("fbp", "norm.json").read_text())["scale"])


def _load_coverage(ctx):
    return np.load(ctx.path("fbp", "coverage.npy"))


def stage_scan(ctx: RunContext, cfg) -> dict:
    """Preprocess the input scan (``[data]``), checkpoint it as NPZ, and choose the held-out angles."""
    scan = prepare_scan(ctx.input_scan, cfg)
    check_memory(scan, ctx.config.operator.backend, ctx.device)
    split = ProjectionSplit.choose(scan.angles, cfg.holdout, cfg.holdout_min, generator=ctx.gen("scan"))
    with atomic_path(ctx.path("scan", "scan.npz")) as tmp:
        scan.save(tmp)
    split.save(ctx.path("scan", "split.json"))
    ctx["scan"], ctx["split"] = scan, split
    g = scan.geometry
    return {"geometry": g.describe(), "projections": list(scan.projections.shape), "reference": scan.reference is not None,
            "heldout_angles": len(split.held), "fit_angles": len(split.fit)}


def stage_fbp(ctx: RunContext, cfg) -> dict:
    """The analytic reconstruction (FBP for parallel/fan beams, FDK for cone beams), of all angles and
    of the fitted ones, the data scale, and the ray coverage of every voxel."""
    A_all, scan, split = ctx["A_all"], ctx["scan"], ctx["split"]
    with torch.no_grad():
        y_all = torch.as_tensor(scan.projections, dtype=A_all.dtype, device=A_all.device)
        x = recon.analytic(A_all, y_all).reshape(A_all.domain_shape)
        x_fit = x
        if split.has_heldout:
            A = ctx["A"]
            y_fit = torch.as_tensor(scan.projections[np.asarray(split.fit)], dtype=A.dtype, device=A.device)
            x_fit = recon.analytic(A, y_fit).reshape(A.domain_shape)
            atomic_save_npy(ctx.path("fbp", "fbp_fit.npy"), x_fit.cpu().numpy())
        cover = recon.ray_coverage(A_all).cpu().numpy()
    atomic_save_npy(ctx.path("fbp", "fbp.npy"), x.cpu().numpy())
    atomic_save_npy(ctx.path("fbp", "coverage.npy"), cover.astype(np.float32))
    q = float(torch.quantile(x_fit.abs().flatten().double()[:2**24], NORM_QUANTILE))
    if not (math.isfinite(q) and q > 0):
        q = float(y_all.abs().max()) or 1.0
    norm = q  # scaling y by k scales the FBP and q by k (exactly for powers of two): y / norm is unit-free
    atomic_write_json(ctx.path("fbp", "norm.json"), {"scale": norm, "quantile": NORM_QUANTILE})
    ctx["fbp"], ctx["fbp_fit"], ctx["norm"], ctx["coverage"] = x, x_fit, norm, cover
    return {"backend": A_all.backend, "method": "fdk" if A_all.geometry.beam == "cone" else "fbp", "norm": norm,
            "fully_covered": float((cover >= FULL_COVERAGE).mean())}


SCAN = Stage("scan", "scan: preprocessing the projections, choosing the held-out angles", stage_scan, "data",
             outputs={"scan": _load_scan, "split": _load_split, "A_all": _make_operator_all, "A": _make_operator,
                      "A_H": _make_operator_heldout, "y": _load_y, "y_H": _load_y_heldout})
FBP = Stage("fbp", "fbp: analytic reconstruction (FBP / FDK), data scale, ray coverage", stage_fbp, "operator",
            outputs={"fbp": _load_fbp, "fbp_fit": _load_fbp_fit, "norm": _load_norm, "coverage": _load_coverage})
