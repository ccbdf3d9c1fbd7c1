"""The scan of each (seed, case): simulated phantoms, or a registered dataset and its reference.

Phantoms are simulated with the case's angles and noise drawn from (seed, case); their
reference is the phantom. A dataset is background-normalised, binned and cropped, reconstructed
from all its angles to give the reference, then reduced to the case's angles — the binning,
cropping and angle subsampling are the pipeline's own ``[data]`` steps
(:func:`dipuq.run.stages.prepare_scan`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dipuq import seeds
from dipuq.data import preprocess
from dipuq.data.loaders import open_dataset
from dipuq.data.phantoms import random_ellipsoids, shepp_logan
from dipuq.operators.simulate import simulate_scan
from dipuq.data.scan import Scan
from dipuq.dip.baselines import make_baseline
from dipuq.errors import ConfigError
from dipuq.experiments.spec import CaseSpec, ExperimentSpec, ScanSpec
from dipuq.geometry import Geometry
from dipuq.operators import RayTransform
from dipuq.run.config import DataConfig
from dipuq.run.stages import prepare_scan

__all__ = ["build_scan", "normalise_background"]


def normalise_background(scan: Scan, edge_cols: int = 8) -> tuple[Scan, np.ndarray]:
    """Subtract each projection's air level: the median of its ``edge_cols`` outermost columns on both sides.

    Real line integrals −log(P/F) are offset when the beam intensity during the scan differs from
    the flat field (Diamond scan 24737: ≈ 0.38 in air). A constant offset per projection is
    inconsistent with any volume inside the field of view and is removed here. Raw counts are
    dropped (the corrected line integrals are no longer their −log). Returns ``(scan, levels)``.
    """
    p = np.asarray(scan.projections, dtype=np.float64)
    if p.shape[-1] <= 2 * edge_cols:
        raise ConfigError(f"scan.edge_cols = {edge_cols} leaves no columns between the edges ({p.shape[-1]} columns)")
    edges = np.concatenate([p[..., :edge_cols], p[..., -edge_cols:]], axis=-1).reshape(p.shape[0], -1)
    levels = np.median(edges, axis=1)  # shape: (angles,)
    q = p - levels.reshape((-1,) + (1,) * (p.ndim - 1))
    meta = {**scan.meta, "background": {"method": "edge median", "edge_cols": edge_cols,
                                        "mean_level": float(levels.mean()), "min": float(levels.min()),
                                        "max": float(levels.max())}}
    return Scan(q.astype(np.float32), scan.geometry, reference=scan.reference, noise_std=scan.noise_std,
                name=scan.name, meta=meta), levels


def _phantom_scan(spec: ScanSpec, case: CaseSpec, seed: int) -> Scan:
    shape = tuple(spec.shape)
    n = max(shape)
    angles_n = case.angles or 60
    arc = math.radians(spec.arc_deg or (360.0 if spec.beam == "cone" else 180.0))
    angles = np.linspace(0, arc, angles_n, endpoint=False)
    cols = int(math.ceil(spec.det_oversample * n))
    if spec.beam == "cone":
        g = Geometry.cone3d(angles, shape, det_shape=(int(math.ceil(spec.det_oversample * 0.84 * n)), cols),
                            source_origin=spec.source_origin * n, origin_detector=spec.origin_detector * n,
                            det_spacing=1.5 * 1.5 / spec.det_oversample)
    elif len(shape) == 2:
        g = Geometry.parallel2d(angles, shape)
    else:
        g = Geometry.parallel3d(angles, shape)
    if spec.phantom == "shepp_logan":
        x = shepp_logan(shape)
    else:
        x = random_ellipsoids(shape, seeds.generator("phantom", seed, case.name))
    noise_level = case.noise_level if case.noise_level is not None else spec.noise_level
    kw = {"noise_level": noise_level} if spec.noise == "gaussian" else {"photons": spec.photons}
    return simulate_scan(x, g, noise=spec.noise, generator=seeds.generator("noise", seed, case.name), **kw,
                         name=f"{spec.phantom} {'x'.join(map(str, shape))}, {spec.beam} beam, {angles_n} angles")


def _reference_recon(full: Scan, spec: ScanSpec, backend: str, device) -> np.ndarray:
    """Reconstruction of the full-angle scan that serves as the reference (see ``scan.reference``)."""
    A = RayTransform(full.geometry, backend=backend, device=device)
    y = torch.as_tensor(full.projections, dtype=A.dtype, device=A.device)
    if spec.reference == "fbp":
        b = make_baseline("fbp")
    elif spec.reference == "tv":
        b = make_baseline("tv", lam=spec.reference_lam, n_iter=spec.reference_iter)
    else:
        b = make_baseline(spec.reference, n_iter=spec.reference_iter)
    with torch.no_grad():
        return b.reconstruct(A, y, generator=seeds.generator("reference")).recon.cpu().numpy().astype(np.float32)


def _data_step(**keys) -> DataConfig:
    """A ``[data]`` section doing only ``keys`` (repeated angles are left to each method's own
    ``[data]``: the Bayes-DIP runs merge them, the baselines see every frame)."""
    return DataConfig(repeated="keep", **keys)


def _dataset_full(spec: ScanSpec) -> tuple[Scan, dict]:
    """The registered dataset, background-normalised, binned, then cropped (``scan.crop_*`` count
    binned pixels): all its angles, no reference yet."""
    opts = {"row": spec.row} if spec.row >= 0 else {}
    scan = open_dataset(spec.dataset, mirror=spec.mirror or None, **opts)
    info = {}
    if spec.background == "edge":
        scan, levels = normalise_background(scan, spec.edge_cols)
        info["background_mean_level"] = float(levels.mean())
    elif scan.has_raw:
        scan = Scan(scan.projections, scan.geometry, noise_std=scan.noise_std, name=scan.name, meta=scan.meta)
    scan = prepare_scan(scan, _data_step(bin=spec.bin))
    if spec.crop_cols or spec.crop_rows:
        cols = []
        if spec.crop_cols:  # the width centred on the rotation axis, as preprocess.crop centres one
            start = int(round(preprocess.axis_column(scan.geometry) - (spec.crop_cols - 1) / 2))
            cols = [start, start + spec.crop_cols]
        scan = prepare_scan(scan, _data_step(crop_cols=cols, crop_rows=list(spec.crop_rows), vol_xy=spec.vol_xy))
    return scan, info


def build_scan(spec: ExperimentSpec, case: CaseSpec, seed: int, device="cpu") -> tuple[Scan, dict]:
    """The scan of ``case`` under ``seed`` that every method sees (with its reference volume).

    Phantoms: simulated with ``case.angles`` views and noise drawn from (seed, case); reference =
    the phantom. Datasets: the preprocessed full-angle scan gives the reference (``scan.reference``
    method), then ``case.angles`` evenly spaced projections are kept. Returns ``(scan, info)``.
    """
    s = spec.scan
    if s.source == "phantom":
        return _phantom_scan(s, case, seed), {}
    full, info = _dataset_full(s)
    if case.angles > full.geometry.n_angles:
        raise ConfigError(f"case {case.name}: angles = {case.angles}, but {s.dataset} has only {full.geometry.n_angles} angles")
    ref = _reference_recon(full, s, spec.pipeline.operator.backend, device)
    if s.unit_scale:
        # Units only: line integrals and attenuation scale together (y = A x is linear), so the
        # DIP, TV weight and learning rates see values of order 1 whatever the voxel size.
        c = 1.0 / float(np.percentile(ref, 99.9))
        full = full.replace(projections=full.projections * c, meta={**full.meta, "unit_scale": c})
        ref = ref * c
        info["unit_scale"] = c
    full = full.replace(reference=ref)
    if s.reference == "fbp" and full.geometry.n_angles >= 4:
        info["reference_noise_std"] = _reference_noise(full, s, spec.pipeline.operator.backend, device)
        info["reference_range"] = float(ref.max() - ref.min())
    scan = prepare_scan(full, _data_step(angles=case.angles))
    scan = scan.replace(name=f"{s.dataset}, {scan.geometry.n_angles} of {full.geometry.n_angles} angles",
                        meta={**scan.meta, "reference": f"{s.reference} of all {full.geometry.n_angles} angles", **info})
    return scan, info


def _reference_noise(full: Scan, spec: ScanSpec, backend: str, device) -> float:
    """The noise std of an FBP reference: the FBPs of the even and of the odd halves of the angles
    differ by noise of variance ≈ 4× that of the full FBP, so std(full) ≈ std(even − odd) / 2 (an
    upper estimate: the two half-sampled FBPs also differ in their streak artefacts)."""
    n = full.geometry.n_angles
    halves = []
    for start in (0, 1):
        idx = np.arange(start, n, 2)[: n // 2]
        half = full.replace(projections=full.projections[idx], geometry=full.geometry.subset(idx), reference=None)
        halves.append(_reference_recon(half, spec, backend, device))
    ev, od = halves
    return float(np.std(ev - od) / 2)
