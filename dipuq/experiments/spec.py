"""The experiment spec: typed sections validated by :mod:`dipuq.run.config`'s machinery.

A spec is a TOML file (``experiments/NAME.toml``) with the sections ``[experiment]``
(:class:`ExperimentInfo`), ``[scan]`` (:class:`ScanSpec`), ``[methods]`` (:class:`MethodsSpec`),
``[pipeline.*]`` (the :class:`~dipuq.run.config.Config` of the Bayes-DIP runs) and a list of
``[[case]]`` tables (:class:`CaseSpec`). Unknown keys are errors, with a "did you mean".
:func:`read_experiment` parses, overrides and validates one (the method names are checked against
the registry by :func:`dipuq.experiments.runner.load_experiment`); :func:`dumps_spec` writes it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from dipuq.data.registry import DATASETS
from dipuq.errors import ConfigError
from dipuq.run.config import Config, apply_overrides, config_from_dict, config_to_dict, dumps_config, option

__all__ = ["ExperimentInfo", "ScanSpec", "MethodsSpec", "CaseSpec", "ExperimentSpec", "experiments_dir",
           "list_experiments", "read_experiment", "spec_to_dict", "dumps_spec"]


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
    tv_lam: float | str = option("auto", "tv: weight λ of TV(x) in (1/m)||Ax − y||² + λ TV(x); 'auto' = chosen on held-out angles")
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


_PIPELINE_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def experiments_dir() -> Path:
    """The folder of named experiment configs: ``$DIPUQ_EXPERIMENTS`` or the repository's ``experiments/``."""
    env = os.environ.get("DIPUQ_EXPERIMENTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "experiments"


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


def read_experiment(name_or_path: str | Path, overrides: Sequence[str] = (), *, quick: bool = False,
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
    if not spec.methods.run:
        raise ConfigError(f"{source}: methods.run is empty")
    s = spec.scan
    if s.source == "dataset":
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
    """The spec as nested plain dicts, its cases as a ``case`` list (what ``request.json`` digests)."""
    d = config_to_dict(spec)
    d["case"] = [{k: v for k, v in dataclasses.asdict(c).items() if v is not None} for c in spec.cases]
    return d


def dumps_spec(spec: ExperimentSpec) -> str:
    """The resolved spec as TOML (loadable again with :func:`read_experiment`)."""
    text = dumps_config(spec)
    text = text.replace("# dipuq resolved configuration (reuse with: dipuq reconstruct ... --config THIS_FILE)",
                        "# dipuq resolved experiment (rerun with: dipuq experiment run THIS_FILE)")
    lines = text.splitlines()
    for c in spec.cases:
        lines += ["", "[[case]]", f"name = {json.dumps(c.name)}", f"angles = {c.angles}"]
        if c.noise_level is not None:
            lines.append(f"noise_level = {c.noise_level!r}")
    return "\n".join(lines) + "\n"
