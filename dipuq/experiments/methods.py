"""The compared methods, one :class:`Method` subclass each, chosen by name from :data:`METHODS`.

A method has a ``name`` (its key in ``methods.run`` and its folder), a ``label`` (its table row),
``bayes`` (whether it is a full dipuq pipeline run, which writes its own run directory) and
``run(job) -> MethodResult`` for one (seed, case) :class:`Job`:

================= =======================================================================
``bayes-sgd``      linearised-DIP posterior (:func:`~dipuq.run.pipeline.run_pipeline`), sgd sampler
``bayes-cg``       the same with the cg sampler; ``bayes-exact``: dense oracle, tiny problems
``bayes-cal``      the default pipeline: cg samples, error bars calibrated on held-out angles
``mcdo``           DIP with MC dropout (:class:`~dipuq.dip.baselines.DipMCDO`)
``fixed-sigma``    the DIP with one constant std, the noise-equivalent std of its residual
``oracle-sigma``   the same with the constant best in hindsight (RMS error: an oracle)
``fbp``, ``tv``    FBP/FDK and TV least squares, point estimates
================= =======================================================================

The Bayes-DIP variants share one DIP fit: their runs start from copies of the bayes-sgd run's
checkpoints of the stages their config leaves valid, and the fixed-σ methods reuse its fit too.
Every random draw comes from :meth:`Job.gen`, a generator of (purpose, seed, case).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dipuq import seeds
from dipuq._io import atomic_write_json, atomic_write_text
from dipuq.data.scan import Scan
from dipuq.dip.baselines import Baseline, Dip, DipMCDO, FixedSigmaDip, make_baseline, oracle_constant_std
from dipuq.dip.driver import DipResult
from dipuq.operators import RayTransform
from dipuq.operators.recon import ray_coverage
from dipuq.run import provenance, resume
from dipuq.run.config import Config, diff_configs, dumps_config, load_config
from dipuq.run.pipeline import run_pipeline
from dipuq.run.rundir import RunDir
from dipuq.run.stages import STAGE_NAMES, STAGES
from dipuq.run.stages.data import FULL_COVERAGE

from dipuq.experiments.spec import CaseSpec, ExperimentSpec, MethodsSpec

__all__ = ["RESULT", "Job", "MethodResult", "Method", "BayesDip", "BayesSGD", "BayesCG", "BayesExact",
           "BayesCalibrated", "MCDropout", "FixedSigma", "OracleSigma", "PointEstimate", "FBP", "TV", "METHODS"]

#: Each method folder's completion marker (metrics, timings, details), written last.
RESULT = "result.json"


@dataclass
class Job:
    """One (seed, case) of an experiment: the scan every method sees, and where their outputs go."""

    spec: ExperimentSpec
    case: CaseSpec
    seed: int
    scan: Scan
    folder: Path  # OUT/seed{S}/{case}; method M writes folder/M
    device: torch.device
    progress: bool
    log: Callable[[str], None]
    dist: Any = None  # the torchrun context when rank 0 drives other ranks, else None
    _A: Any = None
    _mask: Any = None

    @property
    def A(self) -> RayTransform:
        """The ray transform of the scan's geometry (built on first use)."""
        if self._A is None:
            self._A = RayTransform(self.scan.geometry, backend=self.spec.pipeline.operator.backend, device=self.device)
        return self._A

    @property
    def mask(self) -> np.ndarray:
        """The voxels every projection angle sees (the metrics' region, as in a run's metrics.json)."""
        if self._mask is None:
            with torch.no_grad():
                self._mask = (ray_coverage(self.A).cpu().numpy() >= FULL_COVERAGE).reshape(self.scan.geometry.vol_shape)
        return self._mask

    @property
    def y(self) -> torch.Tensor:
        return torch.as_tensor(self.scan.projections, dtype=self.A.dtype, device=self.A.device)

    def gen(self, purpose: str) -> torch.Generator:
        """The generator of ``purpose`` in this (seed, case): the same draws however the job resumes."""
        return seeds.generator(purpose, self.seed, self.case.name)


@dataclass
class MethodResult:
    """A method's output: ``recon`` and ``std`` (None for a point estimate), shaped like the volume
    or flat; wall ``times`` (``time_fit_s``, ``time_uq_s``, ``time_total_s``, ...); ``extra``
    details for its ``result.json`` (``df``: the Student-t shape of calibrated intervals)."""

    recon: np.ndarray
    std: np.ndarray | None
    times: dict[str, float]
    extra: dict = field(default_factory=dict)


class Method:
    """A reconstruction method compared in experiments (see the module docstring)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    bayes: ClassVar[bool] = False  # a dipuq pipeline run: it writes its own recon.npy / std.npy
    #: the per-method pipeline sections (``[refit]``, ``[calibration]``) the result depends on besides
    #: the rest of the pipeline (pipeline runs read them all); a change in another one of them does
    #: not recompute this method
    reads: ClassVar[tuple[str, ...]] = ()

    def run(self, job: Job) -> MethodResult:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Bayes-DIP: full pipeline runs, sharing one DIP fit
# --------------------------------------------------------------------------------------------


class BayesDip(Method):
    """The linearised-DIP posterior of a dipuq pipeline run with sampler ``sampler``."""

    bayes = True
    sampler: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False  # error bars calibrated on the held-out projections

    def config(self, spec: ExperimentSpec) -> Config:
        """The run's config: ``[pipeline]`` with this sampler, no report, calibration as the method says."""
        cfg = spec.pipeline.replace({"sampler.method": self.sampler, "output.report": False,
                                     "calibration.enabled": self.calibrated})
        # the CG options drive bayes-cg's sampling and every method's EM rounds (posterior.em_sampler
        # = "cg" by default), so all Bayes-DIP methods fit g the same way
        return cfg.replace({"sampler.cg_tol": spec.methods.cg_tol, "sampler.cg_max_iter": spec.methods.cg_max_iter})

    def run(self, job: Job) -> MethodResult:
        cfg = self.config(job.spec)
        run = job.folder / self.name
        shared = []
        sources = [n for n in job.spec.methods.run if n != self.name and METHODS[n].bayes]
        candidates = {n: _shareable(job.folder / n, run, cfg) for n in sources}
        src = max(candidates, key=lambda n: len(candidates[n]), default=None)
        if src is not None and candidates[src]:
            shared = _share_fit(job, job.folder / src, run, cfg, candidates[src])
            if shared:
                job.log(f"    sharing stages {', '.join(shared)} of {src}")
        bars = job.progress and sys.stderr.isatty()  # progress bars only on a terminal, stage lines always
        if job.dist is not None:  # the other torchrun ranks join this run (they shard the sampling)
            job.dist.broadcast_object({"scan": job.scan, "config": cfg, "run": str(run), "seed": job.seed,
                                       "device": str(job.device)})
        res = run_pipeline(job.scan, cfg, run, seed=job.seed, device=job.device, progress=bars,
                           log=(lambda m: job.log("    " + m)) if job.progress else (lambda m: None))
        rd = RunDir(run, STAGE_NAMES)
        em_path = rd.stage_dir("posterior") / "em.json"
        em = json.loads(em_path.read_text()) if em_path.exists() else {}
        maps_meta = json.loads(np.load(rd.stage_dir("maps") / "maps.npz")["meta"].item())
        extra = {"g": (em.get("g_trace") or [None])[-1], "sigma2": em.get("sigma2"), "shared_fit": bool(shared),
                 "n_samples": cfg.sampler.n_samples, "run_dir": self.name, "df": maps_meta.get("df")}
        return MethodResult(res.recon, res.std, _split_times(res.timings), extra)


class BayesSGD(BayesDip):
    """Samples by sample-then-optimise with Nesterov SGD; its DIP fit is the one the others share."""

    name = "bayes-sgd"
    label = "Bayes-DIP (sgd)"
    sampler = "sgd"


class BayesCG(BayesDip):
    """Samples by Matheron's rule in the dual, solved by (Nyström-preconditioned) CG."""

    name = "bayes-cg"
    label = "Bayes-DIP (cg)"
    sampler = "cg"


class BayesExact(BayesDip):
    """Exact samples by a dense Cholesky factor: the oracle, for tiny problems only."""

    name = "bayes-exact"
    label = "Bayes-DIP (exact)"
    sampler = "exact"


class BayesCalibrated(BayesDip):
    """The default pipeline: cg samples, error bars calibrated on the held-out projections."""

    name = "bayes-cal"
    label = "Bayes-DIP calibrated (cg)"
    sampler = "cg"
    calibrated = True


def _share_fit(job: Job, src: Path, dst: Path, cfg: Config, shared: list[str]) -> list[str]:
    """Seed run ``dst`` (config ``cfg``) with copies of run ``src``'s stages ``shared``, as found by
    :func:`_shareable`: the stages before the first one reading a config section in which the two
    runs differ (:func:`dipuq.run.resume.first_affected`: a changed sampler keeps scan, fbp, dip
    and linearise), re-keyed for ``cfg``. Returns the stages shared: none when ``src``'s files
    fail their checksums.
    """
    srun, drun = RunDir(src, STAGE_NAMES), RunDir(dst, STAGE_NAMES)
    if any(srun.verify(s) is not None for s in shared):
        return []  # its files fail their checksums: compute afresh
    markers = [srun.marker(s) for s in shared]
    request = provenance.request(job.scan, cfg, job.seed)
    key = provenance.request_key(request)
    drun.create()
    for s, m in zip(shared, markers):
        sd, dd = srun.stage_dir(s), drun.stage_dir(s)
        dd.mkdir(parents=True, exist_ok=True)
        for f in sd.iterdir():
            if f.is_file() and f.name != drun.MARKER:
                shutil.copy2(f, dd / f.name)
        drun.mark_done(s, key, seconds=m.get("seconds", 0.0), summary=m.get("summary", {}), shared_from=str(src))
    atomic_write_text(drun.path(resume.CONFIG_FILE), dumps_config(cfg))
    atomic_write_json(drun.path("stages", resume.REQUEST_FILE), request)  # written last: the run is now valid
    return shared


def _shareable(src: Path, dst: Path, cfg: Config) -> list[str]:
    """The stages of finished run ``src`` that a new run ``dst`` with config ``cfg`` could reuse
    (see :func:`_share_fit`; nothing when ``dst`` already exists or ``src`` has not finished them)."""
    srun, drun = RunDir(src, STAGE_NAMES), RunDir(dst, STAGE_NAMES)
    if not srun.path("stages", resume.REQUEST_FILE).exists() or drun.path("stages", resume.REQUEST_FILE).exists():
        return []
    changed = resume.changed_sections(diff_configs(load_config(srun.path(resume.CONFIG_FILE)), cfg))
    shared = list(STAGE_NAMES[:STAGE_NAMES.index(resume.first_affected(STAGES, changed))])
    return shared if all(srun.marker(s) is not None for s in shared) else []


def _split_times(timings: dict[str, float]) -> dict[str, float]:
    """A pipeline run's stage times as fit (scan, FBP, DIP), UQ (linearise to maps) and total."""
    fit = sum(timings.get(s, 0.0) for s in ("scan", "fbp", "dip", "refit"))
    uq = sum(timings.get(s, 0.0) for s in ("linearise", "posterior", "sampler", "maps"))
    return {"time_fit_s": fit, "time_uq_s": uq, "time_total_s": fit + uq,
            **{f"time_{k}_s": float(v) for k, v in timings.items()}}


# --------------------------------------------------------------------------------------------
# DIP-based uncertainty baselines
# --------------------------------------------------------------------------------------------


class MCDropout(Method):
    """DIP-MCDO: the DIP fitted with channel dropout, then stochastic passes give mean and std."""

    name = "mcdo"
    label = "DIP-MCDO"

    def run(self, job: Job) -> MethodResult:
        m = job.spec.methods
        dcfg = job.spec.pipeline.dip
        cfg = dataclasses.replace(dcfg, network=dataclasses.replace(dcfg.network, dropout=m.mcdo_dropout))
        t0 = time.perf_counter()
        res = DipMCDO(config=cfg, n_samples=m.mcdo_samples).reconstruct(job.A, job.y, generator=job.gen(self.name))
        total = time.perf_counter() - t0
        t_fit = min(total, float(res.meta["dip"].timings.get("total_s", total)))
        return MethodResult(res.recon.cpu().numpy(), res.std.cpu().numpy(),
                            {"time_fit_s": t_fit, "time_uq_s": total - t_fit, "time_total_s": total},
                            {"dropout": m.mcdo_dropout, "n_samples": m.mcdo_samples})


def _dip_fit(job: Job) -> tuple[DipResult, float, bool]:
    """The DIP fit (θ*, f(θ*); its refit on all angles where the run made one) of the experiment's
    first Bayes-DIP run that has one (bayes-sgd first), so that the fixed-σ rows put their constant around the very reconstruction the Bayes
    rows put their error bars around; else a fresh one. The pipeline fits in units divided by the
    scan's scale (``stages/02_fbp/norm.json``): the result comes back in the scan's units. Returns
    it, its wall time (FBP + DIP stages when shared) and whether it was shared."""
    bayes = [n for n in job.spec.methods.run if METHODS[n].bayes]
    for name in sorted(bayes, key=lambda n: n != BayesSGD.name):
        run = RunDir(job.folder / name, STAGE_NAMES)
        path, done, fbp = run.stage_dir("dip") / "dip.pt", run.marker("dip"), run.marker("fbp")
        norm_file = run.stage_dir("fbp") / "norm.json"
        if path.exists() and done is not None and fbp is not None and norm_file.exists():
            seconds = done.get("seconds", 0.0) + fbp.get("seconds", 0.0)
            refit, refit_done = run.stage_dir("refit") / "refit.pt", run.marker("refit")
            if refit.exists() and refit_done is not None:  # the Bayes rows' final reconstruction
                path, seconds = refit, seconds + refit_done.get("seconds", 0.0)
            norm = float(json.loads(norm_file.read_text())["scale"])
            res = DipResult.load(path)
            res = dataclasses.replace(res, recon=res.recon * norm, residual_sigma2=res.residual_sigma2 * norm**2)
            return res, seconds, True
    t0 = time.perf_counter()
    res = Dip(config=job.spec.pipeline.dip).reconstruct(job.A, job.y, generator=job.gen("dip"))
    return res.meta["dip"], time.perf_counter() - t0, False


class FixedSigma(Method):
    """The DIP reconstruction with one constant std: the noise-equivalent std of its residual."""

    name = "fixed-sigma"
    label = "DIP + fixed σ"
    reads = ("refit",)

    def constant(self, job: Job, dip: DipResult, recon: torch.Tensor) -> float:
        """The constant std of this fit."""
        res = FixedSigmaDip(config=job.spec.pipeline.dip).reconstruct(job.A, job.y, generator=job.gen(self.name),
                                                                      result=dip)
        return res.meta["constant_std"]

    def run(self, job: Job) -> MethodResult:
        dip, t_fit, shared = _dip_fit(job)
        t0 = time.perf_counter()
        recon = dip.recon.to(job.A.device, job.A.dtype)
        c = self.constant(job, dip, recon)
        t_uq = time.perf_counter() - t0
        std = torch.full_like(recon, c)
        return MethodResult(recon.cpu().numpy(), std.cpu().numpy(),
                            {"time_fit_s": t_fit, "time_uq_s": t_uq, "time_total_s": t_fit + t_uq},
                            {"constant_std": c, "shared_fit": shared, "sigma2_residual": dip.residual_sigma2})


class OracleSigma(FixedSigma):
    """The same with the constant best in hindsight, the RMS error against the reference (an oracle)."""

    name = "oracle-sigma"
    label = "DIP + oracle σ"

    def constant(self, job: Job, dip: DipResult, recon: torch.Tensor) -> float:
        return oracle_constant_std(recon.cpu(), torch.as_tensor(job.scan.reference))


# --------------------------------------------------------------------------------------------
# Point estimates
# --------------------------------------------------------------------------------------------


class PointEstimate(Method):
    """A classical reconstruction without std, by the :mod:`dipuq.dip.baselines` baseline that
    :meth:`baseline` makes from the ``[methods]`` options."""

    def baseline(self, m: MethodsSpec) -> Baseline:  # pragma: no cover
        raise NotImplementedError

    def run(self, job: Job) -> MethodResult:
        b = self.baseline(job.spec.methods)
        t0 = time.perf_counter()
        with torch.no_grad():
            res = b.reconstruct(job.A, job.y, generator=job.gen(self.name))
        t = time.perf_counter() - t0
        return MethodResult(res.recon.cpu().numpy(), None, {"time_fit_s": t, "time_uq_s": 0.0, "time_total_s": t},
                            dict(res.meta))


class FBP(PointEstimate):
    """FBP (parallel and fan beam) or FDK (cone beam)."""

    name = "fbp"
    label = "FBP/FDK"

    def baseline(self, m: MethodsSpec) -> Baseline:
        return make_baseline("fbp")


class TV(PointEstimate):
    """TV-regularised least squares, ``methods.tv_iter`` PDHG iterations with weight ``methods.tv_lam``."""

    name = "tv"
    label = "TV"

    def baseline(self, m: MethodsSpec) -> Baseline:
        return make_baseline("tv", lam=m.tv_lam, n_iter=m.tv_iter)


#: Method name -> class, in table order.
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (BayesSGD, BayesCG, BayesExact, BayesCalibrated, MCDropout, FixedSigma, OracleSigma,
                              FBP, TV)
}
