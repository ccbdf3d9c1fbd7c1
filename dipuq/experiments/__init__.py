"""Reproducible experiments: named configs, several seeds, Bayes-DIP against baselines.

An *experiment* is a TOML file in ``experiments/`` (see ``experiments/README.md``) with

- ``[experiment]`` — name, title, default number of seeds, ``quick`` overrides for smoke runs;
- ``[scan]`` — where the projections come from: a phantom (Shepp–Logan or random ellipsoids,
  2D parallel or 3D cone beam, Gaussian/Poisson noise) or a registered real dataset (binned,
  cropped, optionally background-normalised), and how the reference volume is made (the
  phantom itself, or a reconstruction from *all* angles);
- ``[[case]]`` — the variants (number of angles, noise level), each run for every seed;
- ``[methods]`` — which methods to compare and their options;
- ``[pipeline]`` — the :class:`dipuq.run.config.Config` of the Bayes-DIP runs (``[pipeline.dip]``...).

Methods (keys of :data:`METHODS`): ``bayes-sgd`` and ``bayes-cg`` (the linearised-DIP posterior
of :func:`dipuq.run.pipeline.run_pipeline` with the sgd / cg sampler; ``bayes-exact`` for tiny
problems), ``mcdo`` (DIP with MC dropout), ``fixed-sigma`` (the DIP reconstruction with one
constant std everywhere, the noise-equivalent std of the DIP residual), ``oracle-sigma`` (the
same with the constant that is best in hindsight, RMS error against the reference — an oracle),
``fbp`` (FBP/FDK) and ``tv`` (TV least squares), both point estimates.

The Bayes-DIP variants share one DIP fit: the cg run starts from copies of the sgd run's
``scan``/``fbp``/``dip``/``linearise`` checkpoints, so only EM and sampling are redone; the
fixed-σ baselines reuse the same fit too. Wall times are per stage; shared stages are counted
in each method's total (they are what that method costs on its own).

Layout of an experiment folder ``OUT``::

    OUT/experiment.toml      resolved spec (rerun with: dipuq experiment run OUT/experiment.toml)
    OUT/request.json         digest of the spec (a rerun with another spec is refused)
    OUT/provenance.json      versions, git commit, command, seeds, threads, device, timings
    OUT/seed{S}/{case}/scan.npz                 the scan every method sees (with reference)
    OUT/seed{S}/{case}/{method}/result.json     per-method marker: metrics and timings
    OUT/seed{S}/{case}/bayes-*/...              full dipuq run directories
    OUT/results.csv          one row per (seed, case, method)
    OUT/table.md, table.csv  mean ± std over seeds
    OUT/figures/{case}_slices.png, {case}_calibration.png

Reproducibility: every random choice is drawn from generators seeded by (seed, case, purpose);
torch runs on a fixed number of threads (``experiment.threads``), so the same seed gives
identical metrics on CPU. An interrupted experiment resumes: finished methods (valid
``result.json``) are skipped and the Bayes-DIP runs resume from their last finished stage.

Example::

    >>> spec = load_experiment("shepp2d", ["dip.iterations=200"])
    >>> res = run_experiment(spec, "runs/shepp2d", seeds=2)
    >>> print(res.table_md)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from dipuq.run.config import Config, apply_overrides, config_digest, config_from_dict, config_to_dict, dumps_config, option
from dipuq import seeds as seeding
from dipuq.errors import ConfigError, DipuqError

__all__ = [
    "ExperimentInfo",
    "ScanSpec",
    "MethodsSpec",
    "CaseSpec",
    "ExperimentSpec",
    "METHODS",
    "METRICS",
    "experiments_dir",
    "list_experiments",
    "load_experiment",
    "build_scan",
    "normalise_background",
    "run_experiment",
    "ExperimentResult",
    "aggregate",
]

#: Method keys, in table order, with their display names.
METHODS = {
    "bayes-sgd": "Bayes-DIP (sgd)",
    "bayes-cg": "Bayes-DIP (cg)",
    "bayes-exact": "Bayes-DIP (exact)",
    "bayes-cal": "Bayes-DIP calibrated (cg)",
    "mcdo": "DIP-MCDO",
    "fixed-sigma": "DIP + fixed σ",
    "oracle-sigma": "DIP + oracle σ",
    "fbp": "FBP/FDK",
    "tv": "TV",
}
BAYES = ("bayes-sgd", "bayes-cg", "bayes-exact", "bayes-cal")
#: Metric keys (result.json / CSV) -> (table header, format, better: "max" | "min" | "one" | None).
METRICS = {
    "psnr": ("PSNR", "{:.2f}", "max"),
    "ssim": ("SSIM", "{:.3f}", "max"),
    "log_likelihood": ("log-lik", "{:.2f}", "max"),
    "coverage_90": ("cov@90", "{:.3f}", None),
    "calibration_error": ("cal.err", "{:.3f}", "min"),
    "spearman_std_abs_error": ("Spearman", "{:.3f}", "max"),
    "crps": ("CRPS", "{:.4f}", "min"),
    "time_fit_s": ("fit s", "{:.0f}", None),
    "time_uq_s": ("UQ s", "{:.0f}", None),
    "time_total_s": ("total s", "{:.0f}", None),
}
RESULT = "result.json"
SHARED_STAGES = ("scan", "fbp", "dip", "linearise")


# --------------------------------------------------------------------------------------------
# The spec: typed sections validated by dipuq.run.config's machinery (unknown keys are errors)
# --------------------------------------------------------------------------------------------


@dataclass
class ExperimentInfo:
    """What the experiment is and how it runs."""

    name: str = option("", "experiment name (default: the file name)")
    title: str = option("", "one-line title")
    description: str = option("", "what it tests and why")
    seeds: int = option(3, "default number of seeds (--seeds overrides)", ge=1)
    threads: int = option(1, "torch CPU threads (fixed so that a seed gives identical numbers)", ge=1)
    device: str = option("cpu", "torch device: cpu, cuda or auto")
    gpu_only: bool = option(False, "sized for a GPU: refuse to run without CUDA")
    figure_slice: int = option(-1, "3D: axial slice shown in comparison figures (-1 = middle)", ge=-1)
    quick: list[str] = option([], "overrides applied by --quick (smoke test sizes)")


@dataclass
class ScanSpec:
    """Where the projections come from and what the reference is."""

    source: Literal["phantom", "dataset"] = option("phantom", "simulate a phantom or load a registered dataset")
    phantom: Literal["shepp_logan", "random_ellipsoids"] = option("shepp_logan", "phantom type")
    shape: list[int] = option([128, 128], "phantom volume shape (y, x) or (z, y, x)")
    beam: Literal["parallel", "cone"] = option("parallel", "phantom geometry: 2D/3D parallel or 3D cone beam")
    arc_deg: float = option(0.0, "angular range in degrees (0 = 180 for parallel, 360 for cone)", ge=0.0)
    det_oversample: float = option(1.5, "phantoms: detector columns (and cone rows) per volume edge voxel", gt=0.0)
    source_origin: float = option(4.0, "cone: source-to-centre distance in volume edges", gt=0.0)
    origin_detector: float = option(2.0, "cone: centre-to-detector distance in volume edges", gt=0.0)
    noise: Literal["gaussian", "poisson"] = option("gaussian", "phantom noise model")
    noise_level: float = option(0.02, "Gaussian noise std as a fraction of mean |A x| (cases may override)", gt=0.0)
    photons: float = option(1e4, "Poisson: photons per detector pixel", gt=0.0)
    dataset: str = option("", "registered dataset name (source = dataset), e.g. tooth, diamond-24737")
    mirror: str = option("", "folder holding the dataset files ('' = $DIPUQ_DATA_MIRROR or the download cache)")
    row: int = option(-1, "2D datasets from a 2-row detector: which row (-1 = the registry's)", ge=-1)
    bin: int = option(1, "bin detector and volume by this factor", ge=1)
    crop_cols: int = option(0, "keep this many detector columns centred on the rotation axis (0 = all)", ge=0)
    crop_rows: list[int] = option([], "3D: detector rows [start, stop] to keep (after binning; [] = all)")
    vol_xy: int = option(0, "in-plane volume size after cropping (0 = the field of view of the kept columns)", ge=0)
    unit_scale: bool = option(False, "datasets: rescale values so that the reference's 99.9th percentile is 1")
    background: Literal["none", "edge"] = option("none", "subtract the per-projection air level (median of the edge columns)")
    edge_cols: int = option(8, "columns at each detector edge used for the air level (before cropping)", ge=1)
    reference: Literal["truth", "fbp", "tv", "cgls", "sirt"] = option(
        "truth", "reference volume: the phantom (truth) or a reconstruction from all angles")
    reference_iter: int = option(200, "iterations of an iterative reference (tv, cgls, sirt)", ge=1)
    reference_lam: float = option(1e-3, "TV weight of a tv reference", ge=0.0)


@dataclass
class MethodsSpec:
    """Which methods run, and their options."""

    run: list[str] = option(["bayes-sgd", "bayes-cg", "mcdo", "fixed-sigma", "oracle-sigma", "fbp", "tv"],
                            "methods to compare (keys of dipuq.experiments.METHODS)")
    cg_tol: float = option(1e-3, "relative residual of the dual CG solves (bayes-cg sampling, and the EM rounds of both Bayes-DIP methods)", gt=0.0)
    cg_max_iter: int = option(300, "most CG iterations per batch (as cg_tol)", ge=1)
    mcdo_dropout: float = option(0.1, "mcdo: channel-dropout probability", gt=0.0, lt=1.0)
    mcdo_samples: int = option(32, "mcdo: stochastic forward passes", ge=2)
    tv_lam: float = option(1e-3, "tv: weight λ of TV(x) in (1/m)||Ax − y||² + λ TV(x)", ge=0.0)
    tv_iter: int = option(300, "tv: PDHG iterations", ge=1)


@dataclass
class ExperimentSpec:
    """A whole experiment (the ``[[case]]`` list is held apart, see :class:`CaseSpec`)."""

    experiment: ExperimentInfo = field(default_factory=ExperimentInfo)
    scan: ScanSpec = field(default_factory=ScanSpec)
    methods: MethodsSpec = field(default_factory=MethodsSpec)
    pipeline: Config = field(default_factory=Config)
    #: the variants (tuple of :class:`CaseSpec`), set by :func:`load_experiment` (not a TOML section)
    cases: ClassVar[tuple] = ()

    @property
    def name(self) -> str:
        return self.experiment.name


@dataclass(frozen=True)
class CaseSpec:
    """One variant: ``name``, ``angles`` (0 = all), ``noise_level`` (phantoms; None = the scan's)."""

    name: str
    angles: int = 0
    noise_level: float | None = None


_SPEC_SECTIONS = ("experiment", "scan", "methods", "pipeline")
_PIPELINE_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def experiments_dir() -> Path:
    """The folder of named experiment configs: ``$DIPUQ_EXPERIMENTS`` or the repository's ``experiments/``."""
    env = os.environ.get("DIPUQ_EXPERIMENTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "experiments"


def list_experiments(folder: str | Path | None = None) -> dict[str, Path]:
    """``{name: path}`` of every ``*.toml`` experiment config in ``folder``."""
    folder = Path(folder) if folder is not None else experiments_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"), key=lambda p: p.stem)} if folder.is_dir() else {}


def _resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return p
    known = list_experiments()
    if str(name_or_path) in known:
        return known[str(name_or_path)]
    import difflib

    close = difflib.get_close_matches(str(name_or_path), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown experiment {str(name_or_path)!r}{hint}; available: {', '.join(known) or 'none'} "
                      f"(see `dipuq experiment list`)")


def _normalise_override(text: str) -> str:
    """``dip.iterations=5`` -> ``pipeline.dip.iterations=5`` (pipeline sections may omit the prefix)."""
    head = text.split("=", 1)[0].strip().split(".")[0]
    return f"pipeline.{text.strip()}" if head in _PIPELINE_SECTIONS else text


def _parse_cases(raw, source: str) -> tuple[CaseSpec, ...]:
    if not raw:
        return (CaseSpec("all"),)
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: [[case]] must be an array of tables")
    allowed = {f.name for f in dataclasses.fields(CaseSpec)}
    out, names = [], set()
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise ConfigError(f"{source}: case {i} must be a table")
        bad = sorted(set(c) - allowed)
        if bad:
            raise ConfigError(f"{source}: unknown key {bad[0]!r} in case {i} (valid: {', '.join(sorted(allowed))})")
        name = c.get("name")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{source}: case {i} needs a name of letters, digits, '-' or '_', got {name!r}")
        if name in names:
            raise ConfigError(f"{source}: duplicate case name {name!r}")
        names.add(name)
        angles = c.get("angles", 0)
        if not isinstance(angles, int) or isinstance(angles, bool) or angles < 0:
            raise ConfigError(f"{source}: case {name}: angles must be an integer >= 0, got {angles!r}")
        nl = c.get("noise_level")
        if nl is not None and (isinstance(nl, bool) or not isinstance(nl, (int, float)) or not nl > 0):
            raise ConfigError(f"{source}: case {name}: noise_level must be > 0, got {nl!r}")
        out.append(CaseSpec(name, angles, None if nl is None else float(nl)))
    return tuple(out)


def load_experiment(name_or_path: str | Path, overrides: Sequence[str] = (), *, quick: bool = False,
                    cases: Sequence[str] | None = None) -> ExperimentSpec:
    """The experiment called ``name_or_path`` (a file in :func:`experiments_dir` or a TOML path).

    ``overrides`` are ``section.key=value`` strings: sections ``experiment``, ``scan``, ``methods``,
    ``pipeline.<stage>`` — or a pipeline stage directly (``dip.iterations=200``). ``quick`` applies
    the spec's own ``experiment.quick`` overrides first. ``cases`` keeps only the named cases.
    """
    path = _resolve(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    all_cases = _parse_cases(raw.pop("case", None), str(path))
    if cases:
        known = {c.name: c for c in all_cases}
        bad = [c for c in cases if c not in known]
        if bad:
            raise ConfigError(f"unknown case {bad[0]!r} in {path.stem}; cases: {', '.join(known)}")
        all_cases = tuple(known[c] for c in dict.fromkeys(cases))
    spec = config_from_dict(raw, source=str(path), cfg_cls=ExperimentSpec)
    if quick and spec.experiment.quick:
        spec = apply_overrides(spec, [_normalise_override(o) for o in spec.experiment.quick])
    if overrides:
        spec = apply_overrides(spec, [_normalise_override(o) for o in overrides])
    if not spec.experiment.name:
        spec = apply_overrides(spec, {"experiment.name": path.stem})
    spec.cases = all_cases
    _validate(spec, str(path))
    return spec


def _validate(spec: ExperimentSpec, source: str) -> None:
    unknown = [m for m in spec.methods.run if m not in METHODS]
    if unknown:
        raise ConfigError(f"{source}: unknown method {unknown[0]!r} in methods.run (valid: {', '.join(METHODS)})")
    if not spec.methods.run:
        raise ConfigError(f"{source}: methods.run is empty")
    s = spec.scan
    if s.source == "dataset":
        from dipuq.data.registry import DATASETS

        if s.dataset not in DATASETS:
            raise ConfigError(f"{source}: scan.dataset must be one of {', '.join(DATASETS)}, got {s.dataset!r}")
        if s.reference == "truth":
            raise ConfigError(f"{source}: a real dataset has no ground truth: set scan.reference to fbp, tv, cgls or sirt")
    else:
        if len(s.shape) not in (2, 3) or min(s.shape) < 8:
            raise ConfigError(f"{source}: scan.shape must be 2 or 3 sizes >= 8, got {s.shape}")
        if s.beam == "cone" and len(s.shape) != 3:
            raise ConfigError(f"{source}: a cone-beam phantom needs a 3D scan.shape")
    if s.crop_rows and len(s.crop_rows) != 2:
        raise ConfigError(f"{source}: scan.crop_rows must be [start, stop], got {s.crop_rows}")
    if spec.experiment.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"{source}: experiment.device must be cpu, cuda or auto, got {spec.experiment.device!r}")


def spec_to_dict(spec: ExperimentSpec) -> dict:
    d = config_to_dict(spec)
    d["case"] = [{k: v for k, v in dataclasses.asdict(c).items() if v is not None} for c in spec.cases]
    return d


def dumps_spec(spec: ExperimentSpec) -> str:
    """The resolved spec as TOML (loadable again with :func:`load_experiment`)."""
    text = dumps_config(spec)
    text = text.replace("# dipuq resolved configuration (reuse with: dipuq reconstruct ... --config THIS_FILE)",
                        "# dipuq resolved experiment (rerun with: dipuq experiment run THIS_FILE)")
    lines = text.splitlines()
    for c in spec.cases:
        lines += ["", "[[case]]", f"name = {json.dumps(c.name)}", f"angles = {c.angles}"]
        if c.noise_level is not None:
            lines.append(f"noise_level = {c.noise_level!r}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Scans
# --------------------------------------------------------------------------------------------


def _seed_gen(*parts) -> torch.Generator:
    """A generator that is a pure function of ``parts`` (ints and strings)."""
    return seeding.generator(*(p if isinstance(p, int) else str(p) for p in parts))


def normalise_background(scan, edge_cols: int = 8):
    """Subtract each projection's air level: the median of its ``edge_cols`` outermost columns on both sides.

    Real line integrals −log(P/F) are offset when the beam intensity during the scan differs from
    the flat field (Diamond scan 24737: ≈ 0.38 in air). A constant offset per projection is
    inconsistent with any volume inside the field of view and is removed here. Raw counts are
    dropped (the corrected line integrals are no longer their −log). Returns ``(scan, levels)``.
    """
    from dipuq.data.scan import Scan

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


def _phantom_scan(spec: ScanSpec, case: CaseSpec, seed: int):
    from dipuq.data.phantoms import random_ellipsoids, shepp_logan, simulate_scan
    from dipuq.geometry import Geometry

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
        x = random_ellipsoids(shape, _seed_gen("phantom", seed, case.name))
    noise_level = case.noise_level if case.noise_level is not None else spec.noise_level
    kw = {"noise_level": noise_level} if spec.noise == "gaussian" else {"photons": spec.photons}
    return simulate_scan(x, g, noise=spec.noise, generator=_seed_gen("noise", seed, case.name), **kw,
                         name=f"{spec.phantom} {'x'.join(map(str, shape))}, {spec.beam} beam, {angles_n} angles")


def _reference_recon(full, spec: ScanSpec, backend: str, device) -> np.ndarray:
    """Reconstruction of the full-angle scan that serves as the reference (see ``scan.reference``)."""
    from dipuq.dip.baselines import make_baseline
    from dipuq.operators import RayTransform

    A = RayTransform(full.geometry, backend=backend, device=device)
    y = torch.as_tensor(full.projections, dtype=A.dtype, device=A.device)
    if spec.reference == "fbp":
        b = make_baseline("fbp")
    elif spec.reference == "tv":
        b = make_baseline("tv", lam=spec.reference_lam, n_iter=spec.reference_iter)
    else:
        b = make_baseline(spec.reference, n_iter=spec.reference_iter)
    with torch.no_grad():
        return b.reconstruct(A, y, generator=_seed_gen("reference")).recon.cpu().numpy().astype(np.float32)


def _dataset_full(spec: ScanSpec):
    """The registered dataset, binned / cropped / background-normalised (all angles, no reference)."""
    from dipuq.data import preprocess
    from dipuq.data.registry import open_dataset

    opts = {"row": spec.row} if spec.row >= 0 else {}
    scan = open_dataset(spec.dataset, mirror=spec.mirror or None, **opts)
    info = {}
    if spec.background == "edge":
        scan, levels = normalise_background(scan, spec.edge_cols)
        info["background_mean_level"] = float(levels.mean())
    elif scan.has_raw:
        from dipuq.data.scan import Scan

        scan = Scan(scan.projections, scan.geometry, noise_std=scan.noise_std, name=scan.name, meta=scan.meta)
    if spec.bin > 1:
        scan = preprocess.bin(scan, spec.bin)
    if spec.crop_cols or spec.crop_rows:
        scan = preprocess.crop(scan, cols=spec.crop_cols or None, rows=tuple(spec.crop_rows) or None,
                               vol_xy=spec.vol_xy or None)
    return scan, info


def build_scan(spec: ExperimentSpec, case: CaseSpec, seed: int, device="cpu"):
    """The scan of ``case`` under ``seed`` that every method sees (with its reference volume).

    Phantoms: simulated with ``case.angles`` views and noise drawn from (seed, case); reference =
    the phantom. Datasets: the preprocessed full-angle scan gives the reference (``scan.reference``
    method), then ``case.angles`` evenly spaced projections are kept. Returns ``(scan, info)``.
    """
    from dipuq.data import preprocess

    s = spec.scan
    if s.source == "phantom":
        return _phantom_scan(s, case, seed), {}
    full, info = _dataset_full(s)
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
        # Noise floor of the reference: FBPs of the even and odd halves of the angles differ by
        # noise of variance ≈ 4× that of the full FBP, so std(full) ≈ std(even − odd) / 2 (an
        # upper estimate: the two half-sampled FBPs also differ in their streak artefacts).
        n = full.geometry.n_angles
        halves = []
        for start in (0, 1):
            idx = np.arange(start, n, 2)[: n // 2]
            half = full.replace(projections=full.projections[idx], geometry=full.geometry.subset(idx), reference=None)
            halves.append(_reference_recon(half, s, spec.pipeline.operator.backend, device))
        ev, od = halves
        info["reference_noise_std"] = float(np.std(ev - od) / 2)
        info["reference_range"] = float(ref.max() - ref.min())
    scan = preprocess.subsample_angles(full, case.angles) if case.angles else full
    scan = scan.replace(name=f"{s.dataset}, {scan.geometry.n_angles} of {full.geometry.n_angles} angles",
                        meta={**scan.meta, "reference": f"{s.reference} of all {full.geometry.n_angles} angles", **info})
    return scan, info


# --------------------------------------------------------------------------------------------
# Methods: each returns (recon, std | None, timings, extra) for one (seed, case)
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    spec: ExperimentSpec
    case: CaseSpec
    seed: int
    scan: Any
    folder: Path
    device: torch.device
    progress: bool
    log: Callable[[str], None]
    dist: Any = None  # the torchrun context when rank 0 drives other ranks, else None
    _A: Any = None

    @property
    def A(self):
        if self._A is None:
            from dipuq.operators import RayTransform

            self._A = RayTransform(self.scan.geometry, backend=self.spec.pipeline.operator.backend, device=self.device)
        return self._A

    @property
    def y(self) -> torch.Tensor:
        return torch.as_tensor(self.scan.projections, dtype=self.A.dtype, device=self.A.device)

    def gen(self, purpose: str) -> torch.Generator:
        return _seed_gen(purpose, self.seed, self.case.name)


def _bayes_config(spec: ExperimentSpec, method: str) -> Config:
    # bayes-sgd/cg/exact are the raw linearised posterior (calibration off, as before); bayes-cal is
    # the default pipeline: cg samples, error bars calibrated on the held-out projections
    sampler, calibrated = ("cg", True) if method == "bayes-cal" else (method.split("-", 1)[1], False)
    cfg = spec.pipeline.replace({"sampler.method": sampler, "output.report": False,
                                 "calibration.enabled": calibrated})
    # the CG options drive bayes-cg's sampling and both methods' EM rounds (posterior.em_sampler
    # = "cg" by default), so bayes-sgd and bayes-cg fit g the same way
    return cfg.replace({"sampler.cg_tol": spec.methods.cg_tol, "sampler.cg_max_iter": spec.methods.cg_max_iter})


def _share_fit(job: _Job, src: Path, dst: Path, cfg: Config) -> bool:
    """Seed run ``dst`` (config ``cfg``) with copies of ``src``'s shared stages, re-keyed for ``cfg``.

    Only when ``src`` finished those stages and the two configs agree on every section they
    depend on (data, operator, dip, linearise). Returns whether anything was shared.
    """
    from dipuq.run import pipeline
    from dipuq.run.config import load_config
    from dipuq._io import atomic_write_json, atomic_write_text
    from dipuq.run.rundir import RunDir

    if not src.joinpath("stages", pipeline.REQUEST_FILE).exists() or dst.joinpath("stages", pipeline.REQUEST_FILE).exists():
        return False
    src_cfg = load_config(src / pipeline.CONFIG_FILE)
    if any(getattr(src_cfg, s) != getattr(cfg, s) for s in ("data", "operator", "dip", "linearise")):
        return False
    srun, drun = RunDir(src, pipeline.STAGES), RunDir(dst, pipeline.STAGES)
    markers = [srun.marker(s) for s in SHARED_STAGES]
    if any(m is None for m in markers) or any(srun.verify(s) is not None for s in SHARED_STAGES):
        return False  # unfinished, or its files fail their checksums: compute afresh
    request = pipeline._request(job.scan, cfg, job.seed)
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    drun.create()
    for s, m in zip(SHARED_STAGES, markers):
        sd, dd = srun.stage_dir(s), drun.stage_dir(s)
        dd.mkdir(parents=True, exist_ok=True)
        for f in sd.iterdir():
            if f.is_file() and f.name != drun.MARKER:
                shutil.copy2(f, dd / f.name)
        drun.mark_done(s, key, seconds=m.get("seconds", 0.0), summary=m.get("summary", {}), shared_from=str(src))
    atomic_write_text(drun.path(pipeline.CONFIG_FILE), dumps_config(cfg))
    atomic_write_json(drun.path("stages", pipeline.REQUEST_FILE), request)  # written last: the run is now valid
    return True


def _split_times(timings: dict[str, float]) -> dict[str, float]:
    fit = sum(timings.get(s, 0.0) for s in ("scan", "fbp", "dip"))
    uq = sum(timings.get(s, 0.0) for s in ("linearise", "posterior", "sampler", "maps"))
    return {"time_fit_s": fit, "time_uq_s": uq, "time_total_s": fit + uq,
            **{f"time_{k}_s": float(v) for k, v in timings.items()}}


def _run_bayes(job: _Job, method: str):
    from dipuq.run.pipeline import run_pipeline

    cfg = _bayes_config(job.spec, method)
    run = job.folder / method
    shared = False
    if method != "bayes-sgd" and "bayes-sgd" in job.spec.methods.run:
        shared = _share_fit(job, job.folder / "bayes-sgd", run, cfg)
        if shared:
            job.log(f"    sharing the DIP fit of bayes-sgd (stages {', '.join(SHARED_STAGES)})")
    bars = job.progress and sys.stderr.isatty()  # progress bars only on a terminal, stage lines always
    if job.dist is not None:  # the other torchrun ranks join this run (they shard the sampling)
        job.dist.broadcast_object({"scan": job.scan, "config": cfg, "run": str(run), "seed": job.seed,
                                   "device": str(job.device)})
    res = run_pipeline(job.scan, cfg, run, seed=job.seed, device=job.device, progress=bars,
                       log=(lambda m: job.log("    " + m)) if job.progress else (lambda m: None))
    em = json.loads((run / "stages" / "05_posterior" / "em.json").read_text()) if (run / "stages" / "05_posterior" / "em.json").exists() else {}
    maps_meta = json.loads(np.load(run / "stages" / "08_maps" / "maps.npz")["meta"].item())
    extra = {"g": (em.get("g_trace") or [None])[-1], "sigma2": em.get("sigma2"), "shared_fit": shared,
             "n_samples": cfg.sampler.n_samples, "run_dir": method, "df": maps_meta.get("df")}
    return res.recon, res.std, _split_times(res.timings), extra


def _dip_result(job: _Job):
    """The bayes-sgd run's DIP fit (θ*, f(θ*)) when there is one, with its wall time."""
    from dipuq.dip.fit import DipResult

    p = job.folder / "bayes-sgd" / "stages" / "03_dip" / "dip.pt"
    done = job.folder / "bayes-sgd" / "stages" / "03_dip" / "done.json"
    if p.exists() and done.exists():
        t = json.loads(done.read_text()).get("seconds", 0.0)
        fbp_done = job.folder / "bayes-sgd" / "stages" / "02_fbp" / "done.json"
        t += json.loads(fbp_done.read_text()).get("seconds", 0.0) if fbp_done.exists() else 0.0
        return DipResult.load(p), t, True
    from dipuq.dip.baselines import Dip

    t0 = time.perf_counter()
    res = Dip(config=job.spec.pipeline.dip).reconstruct(job.A, job.y, generator=job.gen("dip"))
    return res.meta["dip"], time.perf_counter() - t0, False


def _run_fixed(job: _Job, method: str):
    from dipuq.dip.baselines import FixedSigmaDip, oracle_constant_std

    dip, t_fit, shared = _dip_result(job)
    t0 = time.perf_counter()
    recon = dip.recon.to(job.A.device, job.A.dtype)
    if method == "fixed-sigma":
        res = FixedSigmaDip(config=job.spec.pipeline.dip).reconstruct(job.A, job.y, generator=job.gen("fixed-sigma"),
                                                                      result=dip)
        c = res.meta["constant_std"]
    else:
        c = oracle_constant_std(recon.cpu(), torch.as_tensor(job.scan.reference))
    t_uq = time.perf_counter() - t0
    std = torch.full_like(recon, c)
    return (recon.cpu().numpy(), std.cpu().numpy(),
            {"time_fit_s": t_fit, "time_uq_s": t_uq, "time_total_s": t_fit + t_uq},
            {"constant_std": c, "shared_fit": shared, "sigma2_residual": dip.sigma2})


def _run_mcdo(job: _Job, method: str):
    from dipuq.dip.baselines import DipMCDO

    m = job.spec.methods
    dcfg = job.spec.pipeline.dip
    cfg = dataclasses.replace(dcfg, network=dataclasses.replace(dcfg.network, dropout=m.mcdo_dropout))
    t0 = time.perf_counter()
    res = DipMCDO(config=cfg, n_samples=m.mcdo_samples).reconstruct(job.A, job.y, generator=job.gen("mcdo"))
    total = time.perf_counter() - t0
    t_fit = min(total, float(res.meta["dip"].timings.get("total_s", total)))
    return (res.recon.cpu().numpy(), res.std.cpu().numpy(),
            {"time_fit_s": t_fit, "time_uq_s": total - t_fit, "time_total_s": total},
            {"dropout": m.mcdo_dropout, "n_samples": m.mcdo_samples})


def _run_point(job: _Job, method: str):
    from dipuq.dip.baselines import make_baseline

    m = job.spec.methods
    b = make_baseline("tv", lam=m.tv_lam, n_iter=m.tv_iter) if method == "tv" else make_baseline("fbp")
    t0 = time.perf_counter()
    with torch.no_grad():
        res = b.reconstruct(job.A, job.y, generator=job.gen(method))
    t = time.perf_counter() - t0
    return res.recon.cpu().numpy(), None, {"time_fit_s": t, "time_uq_s": 0.0, "time_total_s": t}, dict(res.meta)


_RUNNERS: dict[str, Callable] = {
    "bayes-sgd": _run_bayes, "bayes-cg": _run_bayes, "bayes-exact": _run_bayes, "bayes-cal": _run_bayes,
    "mcdo": _run_mcdo, "fixed-sigma": _run_fixed, "oracle-sigma": _run_fixed, "fbp": _run_point, "tv": _run_point,
}


def method_metrics(reference: np.ndarray, recon: np.ndarray, std: np.ndarray | None,
                   df: float | None = None) -> dict[str, float]:
    """PSNR and SSIM of ``recon``; with a ``std`` also the uncertainty metrics (NaN without);
    ``df``: the Student-t interval shape of calibrated maps."""
    from dipuq.maps.metrics import psnr, ssim, uncertainty_metrics

    if std is not None:
        m = uncertainty_metrics(reference, recon, std, df=df)
    else:
        m = {"psnr": psnr(recon, reference)}
        if reference.ndim in (2, 3) and min(reference.shape) >= 11:
            m["ssim"] = ssim(recon, reference)
    return {k: float(m.get(k, math.nan)) for k in ("psnr", "ssim", "log_likelihood", "coverage_50", "coverage_90",
                                                    "coverage_95", "calibration_error", "spearman_std_abs_error", "crps")}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` returns: per-run rows, the aggregated table, file paths."""

    out: Path
    rows: list[dict]
    table_md: str
    table_rows: list[dict]
    figures: list[Path]
    skipped: int
    computed: int


def _method_key(spec: ExperimentSpec, method: str, scan_digest: str, seed: int) -> str:
    m = dataclasses.asdict(spec.methods)
    m.pop("run")
    blob = {"method": method, "scan": scan_digest, "seed": seed, "methods": m,
            "pipeline": config_to_dict(spec.pipeline)}
    return config_digest(blob)


def _write_json(path: Path, obj) -> None:
    from dipuq._io import atomic_write_json, to_jsonable

    atomic_write_json(path, to_jsonable(obj))


def _check_request(out: Path, spec: ExperimentSpec, force: bool) -> dict:
    """Refuse to mix two different specs in one folder (``--force`` clears the old results)."""
    d = spec_to_dict(spec)
    d["experiment"].pop("seeds", None)  # more seeds may be added to an existing experiment
    d["experiment"].pop("quick", None)
    request = {"experiment": spec.name, "spec": config_digest(d)}
    req_path = out / "request.json"
    if req_path.exists():
        try:
            old = json.loads(req_path.read_text())
        except ValueError:
            old = None
        if old != request:
            if not force:
                raise ConfigError(f"{out} holds experiment results made with a different spec; rerun with --force to "
                                  "start over, or choose another --out")
    elif out.exists() and any(out.iterdir()) and not force:
        raise DipuqError(f"{out} is not empty and is not a dipuq experiment folder; choose another --out")
    if force and out.exists():
        for p in out.iterdir():
            if p.is_dir() and (p.name.startswith("seed") or p.name == "figures"):
                shutil.rmtree(p)
            elif p.is_file() and p.name in ("request.json", "experiment.toml", "provenance.json", "results.csv",
                                             "table.md", "table.csv"):
                p.unlink()
    return request


def run_experiment(
    spec: ExperimentSpec,
    out: str | os.PathLike,
    seeds: int | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    figures: bool = True,
    log: Callable[[str], None] | None = None,
) -> ExperimentResult | None:
    """Run (or resume) every (seed, case, method) of ``spec`` into ``out`` and aggregate.

    Under ``torchrun`` rank 0 drives the experiment (scans, baselines, tables, figures) and the
    other ranks join each Bayes-DIP pipeline run, where the posterior sampling is sharded over
    all ranks; they return None.

    Parameters
    ----------
    spec : from :func:`load_experiment`
    out : experiment folder (created; an existing one with the same spec is resumed)
    seeds : number of seeds 0..seeds-1 (default ``spec.experiment.seeds``)
    force : discard earlier results in ``out``
    progress : stage lines and progress bars on stderr
    figures : write comparison figures (seed 0) into ``out/figures``
    """
    from dipuq.samplers.ranks import init_distributed

    with init_distributed(device=spec.experiment.device) as dist:
        if not dist.is_distributed:
            return _run_experiment(spec, out, seeds, force, progress, figures, log, None)
        if not dist.is_main:
            _serve_pipeline_runs(dist)
            return None
        try:
            return _run_experiment(spec, out, seeds, force, progress, figures, log, dist)
        finally:
            dist.broadcast_object(None)  # releases the other ranks (also when rank 0 failed)


def _serve_pipeline_runs(dist) -> None:
    """Ranks > 0 under torchrun: join every pipeline run rank 0 announces, until it says stop."""
    from dipuq.run.pipeline import run_pipeline

    while (job := dist.broadcast_object(None)) is not None:
        run_pipeline(job["scan"], job["config"], job["run"], seed=job["seed"], device=job["device"], progress=False)


def _run_experiment(spec, out, seeds, force, progress, figures, log, dist) -> ExperimentResult:
    from dipuq.run.pipeline import _git_commit, _versions, resolve_device, scan_digest
    from dipuq._io import atomic_save_npy, atomic_write_text

    seeds = spec.experiment.seeds if seeds is None else seeds
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if (spec.experiment.gpu_only or spec.experiment.device == "cuda") and not torch.cuda.is_available():
        from dipuq.errors import GPUUnavailableError

        raise GPUUnavailableError(f"experiment {spec.name} needs a CUDA GPU (experiment.device = "
                                  f"{spec.experiment.device!r}, gpu_only = {str(spec.experiment.gpu_only).lower()}) "
                                  "and torch sees none; run its CPU-sized sibling instead")
    device = resolve_device(spec.experiment.device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DipuqError(f"--out {out} exists and is not a folder")
    request = _check_request(out, spec, force)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "experiment.toml", dumps_spec(spec))
    _write_json(out / "request.json", request)

    threads = torch.get_num_threads()
    torch.set_num_threads(spec.experiment.threads)
    started, skipped, computed = time.time(), 0, 0
    rows: list[dict] = []
    try:
        for seed in range(seeds):
            for case in spec.cases:
                folder = out / f"seed{seed}" / case.name
                scan_path = folder / "scan.npz"
                if scan_path.exists():
                    from dipuq.data.scan import Scan

                    scan = Scan.load(scan_path)
                else:
                    log(f"[seed {seed}] {case.name}: preparing the scan")
                    scan, _ = build_scan(spec, case, seed, device)
                    from dipuq._io import atomic_path

                    with atomic_path(scan_path) as tmp:
                        scan.save(tmp)
                    scan = type(scan).load(scan_path)  # exactly what a resumed run will see
                digest = scan_digest(scan)
                job = _Job(spec, case, seed, scan, folder, device, progress, log, dist)
                for method in _ordered(spec.methods.run):
                    mdir = folder / method
                    key = _method_key(spec, method, digest, seed)
                    res_path = mdir / RESULT
                    old = _read_json(res_path)
                    if old is not None and old.get("key") == key:
                        skipped += 1
                        log(f"[seed {seed}] {case.name} / {method}: done already, skipping")
                        rows.append({k: (math.nan if v is None else v) for k, v in old["row"].items()})
                        continue
                    res_path.unlink(missing_ok=True)
                    log(f"[seed {seed}] {case.name} / {method}: running")
                    t0 = time.perf_counter()
                    recon, std, times, extra = _RUNNERS[method](job, method)
                    recon = np.asarray(recon, dtype=np.float32).reshape(scan.geometry.vol_shape)
                    if method not in BAYES:  # the pipeline wrote its own recon.npy / std.npy
                        atomic_save_npy(mdir / "recon.npy", recon)
                        if std is not None:
                            atomic_save_npy(mdir / "std.npy", np.asarray(std, dtype=np.float32).reshape(recon.shape))
                    if std is not None:
                        std = np.asarray(std, dtype=np.float32).reshape(recon.shape)
                    metrics = method_metrics(scan.reference, recon, std, df=extra.get("df"))
                    row = {"seed": seed, "case": case.name, "method": method, **metrics, **times}
                    _write_json(res_path, {"key": key, "row": row, "extra": extra,
                                           "wall_s": time.perf_counter() - t0, "finished": time.time()})
                    rows.append(row)
                    computed += 1
                    log(f"[seed {seed}] {case.name} / {method}: PSNR {metrics['psnr']:.2f}"
                        + (f", cov@90 {metrics['coverage_90']:.3f}, cal.err {metrics['calibration_error']:.3f}"
                           if std is not None else "") + f" ({times['time_total_s']:.1f} s)")
    finally:
        torch.set_num_threads(threads)

    _write_rows_csv(out / "results.csv", rows)
    table_rows = aggregate(rows)
    table_md = _table_markdown(spec, table_rows, seeds)
    atomic_write_text(out / "table.md", table_md)
    _write_table_csv(out / "table.csv", table_rows)
    figs = _comparison_figures(spec, out, seed=0) if figures else []
    from dipuq import __version__
    _write_json(out / "provenance.json", {
        "experiment": spec.name, "dipuq_version": __version__, "command": sys.argv, "seeds": seeds,
        "cases": [c.name for c in spec.cases], "methods": list(spec.methods.run),
        "device": str(device), "threads": spec.experiment.threads, "git_commit": _git_commit(),
        "versions": _versions(), "spec_digest": request["spec"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s_this_session": time.time() - started, "computed": computed, "skipped": skipped,
    })
    return ExperimentResult(out, rows, table_md, table_rows, figs, skipped, computed)


def _ordered(methods: Sequence[str]) -> list[str]:
    """Run order: bayes-sgd first (its DIP fit is shared), then the rest as listed."""
    return sorted(methods, key=lambda m: 0 if m == "bayes-sgd" else 1)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std (ddof = 1; 0 for one seed) over seeds, per (case, method), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["method"]), []).append(r)
    out = []
    for (case, method), rs in groups.items():
        agg = {"case": case, "method": method, "n_seeds": len(rs)}
        for k in METRICS:
            vals = np.array([r.get(k, math.nan) for r in rs], dtype=np.float64)
            if np.isnan(vals).all():
                agg[k], agg[f"{k}_std"] = math.nan, math.nan
            else:
                agg[k] = float(np.nanmean(vals))
                agg[f"{k}_std"] = float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def _fmt(v: float, s: float, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    spread = f.format(s) if s and not math.isnan(s) else ""
    return f.format(v) + (f" ± {spread}" if spread and float(spread) != 0 else "")


def _table_markdown(spec: ExperimentSpec, table: list[dict], seeds: int) -> str:
    lines = [f"## {spec.name}: {spec.experiment.title}", "",
             f"Mean ± std over {seeds} seed(s). Best value per column in **bold** (coverage: closest to 0.9). "
             "— = not applicable (point estimate). Times in seconds (fit = FBP + DIP fit; UQ = linearise + EM + sampling, "
             "or MC-dropout passes).", ""]
    for case in dict.fromkeys(r["case"] for r in table):
        rs = [r for r in table if r["case"] == case]
        lines += [f"### {case}", "", "| method | " + " | ".join(h for h, _, _ in METRICS.values()) + " |",
                  "|---|" + "---|" * len(METRICS)]
        best = {}
        for k, (_, _, how) in METRICS.items():
            vals = [(r[k], i) for i, r in enumerate(rs) if not math.isnan(r[k])]
            if k == "coverage_90":
                vals = [(-abs(v - 0.9), i) for v, i in vals]
                how = "max"
            if vals and how in ("max", "min"):
                target = max(v for v, _ in vals) if how == "max" else min(v for v, _ in vals)
                best[k] = {i for v, i in vals if v == target}
        for i, r in enumerate(rs):
            cells = []
            for k, (_, f, _) in METRICS.items():
                c = _fmt(r[k], r[f"{k}_std"], f)
                cells.append(f"**{c}**" if i in best.get(k, ()) and len(rs) > 1 else c)
            label = METHODS[r["method"]] + (f" (n={r['n_seeds']})" if r["n_seeds"] != seeds else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _write_rows_csv(path: Path, rows: list[dict]) -> None:
    from dipuq._io import atomic_write_text

    keys = ["seed", "case", "method"]
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _write_table_csv(path: Path, table: list[dict]) -> None:
    from dipuq._io import atomic_write_text

    keys = ["case", "method", "n_seeds"] + [x for k in METRICS for x in (k, f"{k}_std")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in table:
        w.writerow({k: _cell(r[k]) for k in keys})
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# Figures (seed 0): all methods side by side on one slice; reliability diagrams overlaid
# --------------------------------------------------------------------------------------------


def _comparison_figures(spec: ExperimentSpec, out: Path, seed: int = 0) -> list[Path]:
    from dipuq.show import viz
    from dipuq.data.scan import Scan

    written = []
    for case in spec.cases:
        folder = out / f"seed{seed}" / case.name
        if not (folder / "scan.npz").exists():
            continue
        ref = Scan.load(folder / "scan.npz").reference
        recons, stds = {}, {}
        for method in spec.methods.run:
            if not (folder / method / RESULT).exists():
                continue
            recons[METHODS[method]] = np.load(folder / method / "recon.npy")
            sp = folder / method / "std.npy"
            stds[METHODS[method]] = np.load(sp) if sp.exists() else None
        if not recons:
            continue
        k = spec.experiment.figure_slice
        if ref.ndim == 3:
            k = ref.shape[0] // 2 if k < 0 else min(k, ref.shape[0] - 1)
            take = lambda v: v[k]  # noqa: E731
            where = f", axial slice z = {k}"
        else:
            take = lambda v: v  # noqa: E731
            where = ""
        title = f"{spec.name} / {case.name} (seed {seed}{where})"
        fig = viz.method_comparison({n: take(v) for n, v in recons.items()},
                                    {n: (take(v) if v is not None else None) for n, v in stds.items()},
                                    take(ref), title=title)
        p = out / "figures" / f"{case.name}_slices.png"
        viz.save_figure(fig, p, dpi=80)
        written.append(p)
        curves = [(n, viz.coverage_curve(recons[n] - ref, s)) for n, s in stds.items() if s is not None]
        if curves:
            fig = viz.reliability_diagram([c[1][0] for c in curves], [c[1][1] for c in curves],
                                          labels=[c[0] for c in curves], title=f"Calibration: {spec.name} / {case.name}")
            p = out / "figures" / f"{case.name}_calibration.png"
            viz.save_figure(fig, p, dpi=80)
            written.append(p)
    return written
