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

Methods (:data:`METHODS`, a registry of :class:`~dipuq.experiments.methods.Method` classes):
``bayes-sgd`` and ``bayes-cg`` (the linearised-DIP posterior of
:func:`dipuq.run.pipeline.run_pipeline` with the sgd / cg sampler; ``bayes-exact`` for tiny
problems; ``bayes-cal`` the default pipeline with calibrated error bars), ``mcdo`` (DIP with MC
dropout), ``fixed-sigma`` (the DIP reconstruction with one constant std everywhere, the
noise-equivalent std of the DIP residual), ``oracle-sigma`` (the same with the constant that is
best in hindsight, RMS error against the reference — an oracle), ``fbp`` (FBP/FDK) and ``tv``
(TV least squares), both point estimates.

The Bayes-DIP variants share one DIP fit: the cg run starts from copies of the sgd run's
``scan``/``fbp``/``dip``/``linearise`` checkpoints, so only EM and sampling are redone; the
fixed-σ baselines reuse the same fit too. Wall times are per stage; shared stages are counted
in each method's total (they are what that method costs on its own).

Modules: :mod:`~dipuq.experiments.spec` (the spec and its validation), ``scans`` (each case's
scan), ``methods`` (the methods), ``runner`` (the driver: seeds × cases × methods, resume,
provenance), ``tables`` (metrics, CSV and Markdown tables), ``figures``.

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

from dipuq.experiments.methods import METHODS, Method, MethodResult
from dipuq.experiments.runner import ExperimentResult, load_experiment, run_experiment
from dipuq.experiments.scans import build_scan, normalise_background
from dipuq.experiments.spec import (
    CaseSpec,
    ExperimentInfo,
    ExperimentSpec,
    MethodsSpec,
    ScanSpec,
    experiments_dir,
    list_experiments,
    read_experiment,
)
from dipuq.experiments.tables import METRICS, aggregate

__all__ = [
    "ExperimentInfo",
    "ScanSpec",
    "MethodsSpec",
    "CaseSpec",
    "ExperimentSpec",
    "METHODS",
    "Method",
    "MethodResult",
    "METRICS",
    "experiments_dir",
    "list_experiments",
    "load_experiment",
    "read_experiment",
    "build_scan",
    "normalise_background",
    "run_experiment",
    "ExperimentResult",
    "aggregate",
]
