"""The experiment driver: every (seed, case, method) of a spec into one folder, resumable.

For each seed and case the scan is built once (:func:`~dipuq.experiments.scans.build_scan`)
and saved; every method then runs on exactly what a resumed run will load. A method whose
``result.json`` records the same key — the run request of :func:`dipuq.run.provenance.request`
(scan digest, seed, pipeline config) plus the method and its options — is skipped; the
Bayes-DIP runs resume from their last finished stage. The spec's digest in ``request.json``
keeps two specs from mixing in one folder. ``provenance.json`` records versions and git commit
with the pipeline's own functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dipuq import __version__, threads
from dipuq._io import atomic_path, atomic_save_npy, atomic_write_json, atomic_write_text, to_jsonable
from dipuq.data.scan import Scan
from dipuq.errors import ConfigError, DipuqError, GPUUnavailableError
from dipuq.experiments.figures import comparison_figures
from dipuq.experiments.methods import METHODS, RESULT, BayesSGD, Job
from dipuq.experiments.scans import build_scan
from dipuq.experiments.spec import ExperimentSpec, dumps_spec, read_experiment, spec_to_dict
from dipuq.experiments.tables import aggregate, method_metrics, table_markdown, write_rows_csv, write_table_csv
from dipuq.run import provenance
from dipuq.run.config import config_digest, config_to_dict
from dipuq.run.context import resolve_device
from dipuq.run.pipeline import run_pipeline
from dipuq.samplers.ranks import init_distributed

__all__ = ["ExperimentResult", "run_experiment"]

#: What --force removes from an experiment folder (besides the seed{S}/ and figures/ folders).
_OUTPUTS = ("request.json", "experiment.toml", "provenance.json", "results.csv", "table.md", "table.csv")


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


def load_experiment(name_or_path: str | Path, overrides: Sequence[str] = (), *, quick: bool = False,
                    cases: Sequence[str] | None = None) -> ExperimentSpec:
    """The experiment ``name_or_path`` read, overridden and validated by
    :func:`~dipuq.experiments.spec.read_experiment`, with every name in ``methods.run`` checked
    against the method registry :data:`~dipuq.experiments.methods.METHODS`."""
    spec = read_experiment(name_or_path, overrides, quick=quick, cases=cases)
    unknown = [m for m in spec.methods.run if m not in METHODS]
    if unknown:
        raise ConfigError(f"{name_or_path}: unknown method {unknown[0]!r} in methods.run (valid: {', '.join(METHODS)})")
    return spec


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
    while (job := dist.broadcast_object(None)) is not None:
        run_pipeline(job["scan"], job["config"], job["run"], seed=job["seed"], device=job["device"], progress=False)


def _run_experiment(spec, out, seeds, force, progress, figures, log, dist) -> ExperimentResult:
    """:func:`run_experiment` on rank 0 (or alone): check, run what is not done, write tables and figures."""
    seeds = spec.experiment.seeds if seeds is None else seeds
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if (spec.experiment.gpu_only or spec.experiment.device == "cuda") and not torch.cuda.is_available():
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

    started, rows, computed = time.time(), [], 0
    with threads.fixed(spec.experiment.threads):  # the thread governor may not try more threads either
        for seed in range(seeds):
            for case in spec.cases:
                scan = _case_scan(spec, case, seed, out, device, log)
                job = Job(spec, case, seed, scan, out / f"seed{seed}" / case.name, device, progress, log, dist)
                req = provenance.request(scan, spec.pipeline, seed)
                for method in _ordered(spec.methods.run):
                    m = METHODS[method]
                    row, ran = _run_method(job, method, req if m.bayes else
                                           {**req, "config": _core_digest(spec.pipeline, keep=m.reads)})
                    rows.append(row)
                    computed += ran

    write_rows_csv(out / "results.csv", rows)
    table_rows = aggregate(rows)
    table_md = table_markdown(spec, table_rows, seeds)
    atomic_write_text(out / "table.md", table_md)
    write_table_csv(out / "table.csv", table_rows)
    figs = comparison_figures(spec, out, seed=0) if figures else []
    skipped = len(rows) - computed
    _write_json(out / "provenance.json", {
        "experiment": spec.name, "dipuq_version": __version__, "command": sys.argv, "seeds": seeds,
        "cases": [c.name for c in spec.cases], "methods": list(spec.methods.run),
        "device": str(device), "threads": spec.experiment.threads, "git_commit": provenance.git_commit(),
        "versions": provenance.versions(), "spec_digest": request["spec"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s_this_session": time.time() - started, "computed": computed, "skipped": skipped,
    })
    return ExperimentResult(out, rows, table_md, table_rows, figs, skipped, computed)


def _case_scan(spec: ExperimentSpec, case, seed: int, out: Path, device, log) -> Scan:
    """The scan of (seed, case): loaded from ``scan.npz``, or built and saved there first."""
    scan_path = out / f"seed{seed}" / case.name / "scan.npz"
    if not scan_path.exists():
        log(f"[seed {seed}] {case.name}: preparing the scan")
        scan, _ = build_scan(spec, case, seed, device)
        with atomic_path(scan_path) as tmp:
            scan.save(tmp)
    return Scan.load(scan_path)  # exactly what a resumed run will see


def _run_method(job: Job, name: str, request: dict) -> tuple[dict, bool]:
    """Run method ``name`` on ``job`` unless its ``result.json`` is current; return its row and whether it ran."""
    seed, case, scan = job.seed, job.case.name, job.scan
    mdir = job.folder / name
    key = _method_key(job.spec, name, request)
    res_path = mdir / RESULT
    old = _read_json(res_path)
    if old is not None and old.get("key") == key:
        job.log(f"[seed {seed}] {case} / {name}: done already, skipping")
        row = {k: (math.nan if v is None else v) for k, v in old["row"].items()}
        if (mdir / "recon.npy").exists():  # the metrics of its saved maps, by the current metric code
            std = np.load(mdir / "std.npy") if (mdir / "std.npy").exists() else None
            row.update(method_metrics(scan.reference, np.load(mdir / "recon.npy"), std,
                                      df=old.get("extra", {}).get("df"), mask=job.mask))
        return row, False
    res_path.unlink(missing_ok=True)
    job.log(f"[seed {seed}] {case} / {name}: running")
    t0 = time.perf_counter()
    method = METHODS[name]()
    res = method.run(job)
    recon = np.asarray(res.recon, dtype=np.float32).reshape(scan.geometry.vol_shape)
    std = None if res.std is None else np.asarray(res.std, dtype=np.float32).reshape(recon.shape)
    if not method.bayes:  # a pipeline run wrote its own recon.npy / std.npy
        atomic_save_npy(mdir / "recon.npy", recon)
        if std is not None:
            atomic_save_npy(mdir / "std.npy", std)
    metrics = method_metrics(scan.reference, recon, std, df=res.extra.get("df"), mask=job.mask)
    row = {"seed": seed, "case": case, "method": name, **metrics, **res.times}
    _write_json(res_path, {"key": key, "row": row, "extra": res.extra,
                           "wall_s": time.perf_counter() - t0, "finished": time.time()})
    job.log(f"[seed {seed}] {case} / {name}: PSNR {metrics['psnr']:.2f}"
            + (f", cov@90 {metrics['coverage_90']:.3f}, cal.err {metrics['calibration_error']:.3f}"
               if std is not None else "") + f" ({res.times['time_total_s']:.1f} s)")
    return row, True


#: Pipeline sections that only some methods read (``Method.reads``): a change there reruns
#: those methods only, and does not make the folder "a different spec".
_PER_METHOD_SECTIONS = ("refit", "calibration")


def _core_digest(config, keep: tuple[str, ...] = ()) -> str:
    """The pipeline config's digest without the :data:`_PER_METHOD_SECTIONS` not in ``keep``."""
    d = config_to_dict(config)
    for k in _PER_METHOD_SECTIONS:
        if k not in keep:
            d.pop(k, None)
    return config_digest(d)


def _method_key(spec: ExperimentSpec, method: str, request: dict) -> str:
    """What a method's result belongs to: the run ``request`` (scan, seed, pipeline config), the
    method and the ``[methods]`` options (all but the list of methods)."""
    options = dataclasses.asdict(spec.methods)
    options.pop("run")
    return provenance.request_key({**request, "method": method, "methods": options})


def _ordered(methods: Sequence[str]) -> list[str]:
    """Run order: bayes-sgd first (its DIP fit is shared), then the rest as listed."""
    return sorted(methods, key=lambda m: m != BayesSGD.name)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, to_jsonable(obj))


def _check_request(out: Path, spec: ExperimentSpec, force: bool) -> dict:
    """Refuse to mix two different specs in one folder (``--force`` clears the old results)."""
    d = spec_to_dict(spec)
    d["experiment"].pop("seeds", None)  # more seeds may be added to an existing experiment
    d["experiment"].pop("quick", None)
    for k in _PER_METHOD_SECTIONS:  # the methods that read them are keyed by them (_method_key)
        d.get("pipeline", {}).pop(k, None)
    request = {"experiment": spec.name, "spec": config_digest(d)}
    req_path = out / "request.json"
    if req_path.exists():
        if _read_json(req_path) != request and not force:
            raise ConfigError(f"{out} holds experiment results made with a different spec; rerun with --force to "
                              "start over, or choose another --out")
    elif out.exists() and any(out.iterdir()) and not force:
        raise DipuqError(f"{out} is not empty and is not a dipuq experiment folder; choose another --out")
    if force and out.exists():
        for p in out.iterdir():
            if p.is_dir() and (p.name.startswith("seed") or p.name == "figures"):
                shutil.rmtree(p)
            elif p.is_file() and p.name in _OUTPUTS:
                p.unlink()
    return request
