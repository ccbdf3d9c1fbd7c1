"""The whole job as resumable stages: scan → FBP/FDK → DIP → linearise → EM → sampler → maps →
metrics → figures → report.

Each stage is a function ``stage(ctx, section)`` that receives its config section whole, reads
earlier stages' outputs through the :class:`RunContext` (loaded lazily from their checkpoints
when the run resumes), and writes its own checkpoint files under ``RUN/stages/NN_name/`` before
its ``done.json`` marker. :func:`run_pipeline` is the driver: it checks that an existing run
directory holds the same request (scan, config, seed), skips finished stages (saying so), times
every stage into ``provenance.json`` and shows progress bars. The algorithms it calls are
generators that never print; everything printed comes from here.

Randomness: every stage draws from its own ``torch.Generator`` seeded by ``(seed, stage)``, so a
resumed run gives the same numbers as an uninterrupted one.

Example::

    >>> from dipuq.run.config import load_config
    >>> from dipuq.data.loaders import load_scan
    >>> result = run_pipeline(load_scan("scan.npz"), load_config(None, ["dip.iterations=500"]),
    ...                       "runs/scan", seed=0)
    >>> result.std.shape == result.recon.shape
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dipuq import __version__, seeds
from dipuq.run.config import Config, config_digest, config_to_dict, diff_configs, dumps_config, load_config
from dipuq.data.scan import Scan
from dipuq.errors import ConfigError, DipuqError, GPUUnavailableError
from dipuq._io import atomic_path, atomic_save_npy, atomic_save_tiff, atomic_write_json, atomic_write_text, load_torch, save_torch, to_jsonable
from dipuq.run.rundir import RunDir, RunLock
from dipuq.samplers.base import SAMPLER_RESIDUAL_WARN

__all__ = ["STAGES", "RunContext", "RunResult", "run_pipeline", "prepare_scan", "resolve_device", "stage_generator"]

#: Stage names in pipeline order (folder ``stages/NN_name``).
STAGES = ("scan", "fbp", "dip", "linearise", "posterior", "sampler", "calibrate", "maps", "metrics", "figures",
          "report")
CONFIG_FILE = "config.toml"
REQUEST_FILE = "request.json"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def stage_generator(seed: int, stage: str, device="cpu") -> torch.Generator:
    """The generator of ``stage`` under run seed ``seed`` (a pure function of both)."""
    return seeds.generator(seed, STAGES.index(stage), device=device)


def resolve_device(device: str | None) -> torch.device:
    """``"cpu"``, ``"cuda"`` (checked) or ``"auto"``/None (cuda when usable, else cpu)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise GPUUnavailableError(f"--device {device} requested but torch sees no CUDA device; use --device cpu")
        return torch.device(device)
    raise ConfigError(f"unknown device {device!r}: use cpu, cuda or auto")


def scan_digest(scan: Scan) -> str:
    """SHA-256 (16 hex) of a scan's projections, geometry and reference: its identity for resume."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(scan.projections).tobytes())
    h.update(json.dumps(scan.geometry.to_dict(), sort_keys=True, default=str).encode())
    if scan.reference is not None:
        h.update(np.ascontiguousarray(scan.reference).tobytes())
    h.update(repr(scan.noise_std).encode())
    return h.hexdigest()[:16]


def prepare_scan(scan: Scan, cfg) -> Scan:
    """Apply the ``[data]`` section: merge repeated angles, stripe filter, angle subsampling, crop, binning.

    Each step is the identity at its default (a scan without repeated angles is returned as is).
    """
    from dipuq.data import preprocess

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


def _versions() -> dict[str, str]:
    out = {"dipuq": __version__, "python": platform.python_version()}
    for dist in ("torch", "numpy", "scipy", "astra-toolbox", "tifffile", "matplotlib", "h5py"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------
# Context and result
# --------------------------------------------------------------------------------------------


@dataclass
class RunContext:
    """What the stages share: the run folder, request, device, and stage outputs (lazy).

    ``ctx[name]`` returns an output (``"scan"``, ``"A"``, ``"y"``, ``"fbp"``, ``"dip"``, ``"net"``,
    ``"model"``, ``"scale"``, ``"posterior"``, ``"em"``, ``"moments"``, ``"sampling"``, ``"maps"``,
    ``"metrics"``), computing or loading it on first use.
    """

    run: RunDir
    config: Config
    seed: int
    device: torch.device
    progress: bool = True
    input_scan: Scan | None = None
    values: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print
    dist: Any = None  # dipuq.samplers.ranks.DistContext: rank 0 writes, all ranks sample

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def __getitem__(self, name: str):
        if name not in self.values:
            self.values[name] = _LOADERS[name](self)
        return self.values[name]

    def __setitem__(self, name: str, value) -> None:
        self.values[name] = value

    def gen(self, stage: str) -> torch.Generator:
        return stage_generator(self.seed, stage)

    def path(self, stage: str, name: str) -> Path:
        return self.run.stage_path(stage, name)

    def tqdm(self, **kw):
        from tqdm.auto import tqdm

        return tqdm(disable=not self.progress, dynamic_ncols=True, leave=False, file=sys.stderr, **kw)


@dataclass
class RunResult:
    """What :func:`run_pipeline` returns: the volumes, metrics and where everything is."""

    run_dir: Path
    recon: np.ndarray
    std: np.ndarray
    metrics: dict | None
    timings: dict[str, float]
    resumed_from: str | None


# --------------------------------------------------------------------------------------------
# Loaders of finished stages' outputs
# --------------------------------------------------------------------------------------------


def _load_scan(ctx):
    return Scan.load(ctx.path("scan", "scan.npz"))


def _load_split(ctx):
    from dipuq.data.split import ProjectionSplit

    path = ctx.path("scan", "split.json")
    return ProjectionSplit.load(path) if path.exists() else ProjectionSplit.none(ctx["scan"].geometry.n_angles)


def _operator(ctx, geometry):
    from dipuq.operators import RayTransform

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


def _load_dip(ctx):
    from dipuq.dip.fit import DipResult

    return DipResult.load(ctx.path("dip", "dip.pt"))


def _load_net(ctx):
    return ctx["dip"].build_net(device=ctx.device)


def _load_model(ctx):
    from dipuq.posterior.linearise import LinearisedModel

    cfg = ctx.config.linearise
    dip = ctx["dip"]
    return LinearisedModel(ctx["net"], dip.net_input.to(ctx.device), ctx["A"], params=cfg.params,
                           batching=cfg.batching, chunk_size=cfg.chunk_size or None)


def _load_scale(ctx):
    return load_torch(ctx.path("linearise", "scale.pt"))["scale"].to(ctx.device)


def _load_posterior(ctx):
    from dipuq.posterior.model import Posterior

    return Posterior.load(ctx.path("posterior", "posterior.pt"), ctx["model"], ctx["A"])


def _load_em(ctx):
    return json.loads(ctx.path("posterior", "em.json").read_text())


def _load_moments(ctx):
    from dipuq.samplers.moments import Moments

    return Moments.from_state_dict(load_torch(ctx.path("sampler", "moments.pt")))


def _load_extra_moments(ctx):
    from dipuq.samplers.moments import Moments

    path = ctx.path("sampler", "moments_extra.pt")
    if not path.exists():
        return {}
    return {k: Moments.from_state_dict(v) for k, v in load_torch(path).items()}


def _load_sampling(ctx):
    return json.loads(ctx.path("sampler", "sampling.json").read_text())


def _load_calibration(ctx):
    return json.loads(ctx.path("calibrate", "calibration.json").read_text())


def _load_maps(ctx):
    from dipuq.maps.uncertainty import UncertaintyMaps

    return UncertaintyMaps.load(ctx.path("maps", "maps.npz"))


def _load_metrics(ctx):
    p = ctx.run.path("metrics.json")
    return json.loads(p.read_text()) if p.exists() else None


_LOADERS: dict[str, Callable[[RunContext], Any]] = {
    "scan": _load_scan, "split": _load_split, "A_all": _make_operator_all, "A": _make_operator,
    "A_H": _make_operator_heldout, "y": _load_y, "y_H": _load_y_heldout, "fbp": _load_fbp,
    "fbp_fit": _load_fbp_fit, "norm": _load_norm, "coverage": _load_coverage, "dip": _load_dip, "net": _load_net,
    "model": _load_model, "scale": _load_scale, "posterior": _load_posterior, "em": _load_em,
    "moments": _load_moments, "extra_moments": _load_extra_moments, "sampling": _load_sampling,
    "calibration": _load_calibration, "maps": _load_maps, "metrics": _load_metrics,
}


# --------------------------------------------------------------------------------------------
# Stages: each takes the context and its config section, writes its files, returns a summary
# --------------------------------------------------------------------------------------------


def stage_scan(ctx: RunContext, cfg) -> dict:
    """Preprocess the input scan (``[data]``), checkpoint it as NPZ, and choose the held-out angles."""
    from dipuq.data.split import ProjectionSplit

    scan = prepare_scan(ctx.input_scan, cfg)
    _check_memory(scan, ctx.config.operator.backend, ctx.device)
    split = ProjectionSplit.choose(scan.angles, cfg.holdout, cfg.holdout_min, generator=ctx.gen("scan"))
    with atomic_path(ctx.path("scan", "scan.npz")) as tmp:
        scan.save(tmp)
    split.save(ctx.path("scan", "split.json"))
    ctx["scan"], ctx["split"] = scan, split
    g = scan.geometry
    return {"geometry": g.describe(), "projections": list(scan.projections.shape), "reference": scan.reference is not None,
            "heldout_angles": len(split.held), "fit_angles": len(split.fit)}


#: The scan's scale (``norm``) is this quantile of |FBP of the fitted angles|: a robust "typical
#: bright voxel", so that every later stage works on an image of order one whatever the data's units.
NORM_QUANTILE = 0.995


def _check_memory(scan: Scan, backend: str, device: torch.device) -> None:
    """Refuse, before any work, a scan whose ray transform cannot fit in memory (one line)."""
    from dipuq.memory import check_operator
    from dipuq.operators.ray import BACKENDS, available_backends

    if backend == "auto":
        ok = [k for k in available_backends(scan.geometry) if device.type == "cuda" or not BACKENDS[k].requires_cuda]
        backend = ok[0] if ok else "cpu-cone"
    check_operator(scan.geometry, backend)


def stage_fbp(ctx: RunContext, cfg) -> dict:
    """The analytic reconstruction (FBP for parallel/fan beams, FDK for cone beams), of all angles and
    of the fitted ones, the data scale, and the ray coverage of every voxel."""
    from dipuq.operators import recon

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


#: A voxel is in the covered region (metrics, report) when rays of at least this share of the
#: angles reach it.
FULL_COVERAGE = 0.999


def _dip_config(cfg, norm: float):
    """The ``[dip]`` section in fit units (a known noise variance is divided by norm²)."""
    return dataclasses.replace(cfg, sigma2=cfg.sigma2 / norm**2) if cfg.sigma2 else cfg


def stage_dip(ctx: RunContext, cfg) -> dict:
    """Fit the deep image prior on the fitted angles, stopped by the held-out ones (resumes a partly
    finished fit from its own checkpoint); compare it with the FBP on the held-out projections."""
    from dipuq.dip.fit import run_dip
    from dipuq.maps.metrics import psnr
    from dipuq.dip.networks import UNet

    A, y, scan, norm = ctx["A"], ctx["y"], ctx["scan"], ctx["norm"]
    gen = ctx.gen("dip")
    net = UNet.from_config(cfg.network, ndim=len(A.domain_shape), generator=gen).to(device=ctx.device, dtype=A.dtype)
    x_input = (ctx["fbp_fit"] / norm).reshape(1, 1, *A.domain_shape).to(A.dtype) if cfg.input == "fbp" else None
    callbacks, psnr_trace = [], {"iteration": [], "psnr": []}
    if scan.reference is not None:
        ref = torch.as_tensor(scan.reference) / norm
        every = max(1, cfg.iterations // 150)

        def track(state):
            if state.iteration % every == 0 or state.stop_reason is not None:
                psnr_trace["iteration"].append(state.iteration)
                psnr_trace["psnr"].append(psnr(state.recon.cpu(), ref))

        callbacks.append(track)
    if ctx.device.type == "cpu":
        from dipuq.threads import ThreadGovernor

        callbacks.append(ThreadGovernor(log=ctx.log))
    validation = (ctx["A_H"], ctx["y_H"]) if ctx["split"].has_heldout else None
    result = run_dip(net, A, y, _dip_config(cfg, norm), x_input=x_input, generator=gen,
                     checkpoint=ctx.path("dip", "fit.ckpt"), callbacks=callbacks, progress=ctx.progress,
                     validation=validation)
    atomic_write_json(ctx.path("dip", "psnr_trace.json"), psnr_trace)
    result.save(ctx.path("dip", "dip.pt"))
    ctx["dip"], ctx["net"] = result, net
    check = _heldout_check(ctx, result, cfg)
    check["unfinished"] = _dip_unfinished(result)
    if check["unfinished"]:
        ctx.log(f"dipuq: warning: the DIP reached dip.{'iterations' if result.stop_reason == 'iterations' else 'max_seconds'}"
                f" while its held-out loss was still improving (kept iterate {result.best_iteration} of "
                f"{result.iterations}): the fit may be unfinished")
    atomic_write_json(ctx.path("dip", "heldout.json"), check)
    return {"iterations": result.iterations, "best_iteration": result.best_iteration, "stop_reason": result.stop_reason,
            "residual_sigma2": result.sigma2, **{k: v for k, v in check.items() if k != "message"}}


def _heldout_check(ctx: RunContext, dip, cfg) -> dict:
    """Mean squared held-out residual of the DIP and of the FBP of the same fitted angles; warns
    (or, with ``dip.fallback = "error"``, stops) when the FBP explains the held-out data better."""
    A_H, y_H = ctx["A_H"], ctx["y_H"]
    if A_H is None:
        return {"heldout": False}
    with torch.no_grad():
        dip_mse = float((A_H(dip.recon.to(A_H.dtype)) - y_H).double().square().mean())
        fbp_mse = float((A_H((ctx["fbp_fit"] / ctx["norm"]).to(A_H.dtype)) - y_H).double().square().mean())
    out = {"heldout": True, "heldout_mse_dip": dip_mse, "heldout_mse_fbp": fbp_mse, "fbp_wins": fbp_mse <= dip_mse}
    if out["fbp_wins"]:
        msg = (f"the FBP/FDK explains the held-out projections better than the DIP (mean squared residual "
               f"{fbp_mse:.3g} vs {dip_mse:.3g}): the DIP reconstruction is not to be trusted over the FBP here; "
               "try a longer fit (dip.iterations, dip.patience), another dip.lr or dip.gamma")
        out["message"] = msg
        if cfg.fallback == "error":
            raise DipuqError(msg + " (dip.fallback = 'error')")
        ctx.log(f"dipuq: warning: {msg}")
    return out


def stage_linearise(ctx: RunContext, cfg) -> dict:
    """Linearise the network at θ* and estimate the g-prior scales s."""
    from dipuq.posterior.model import gprior_scale

    model = ctx["model"]
    scale = gprior_scale(model, ctx["A"], n_probes=cfg.diag_probes or None, generator=ctx.gen("linearise"))
    save_torch({"scale": scale.cpu(), "p": model.p}, ctx.path("linearise", "scale.pt"))
    ctx["scale"] = scale
    return {"p": model.p, "d": model.d}


def _sigma2(ctx: RunContext, cfg) -> tuple[float, str]:
    """σ² of the fitted projections in fit units (the scan's units / norm²), and where it came from."""
    scan, norm = ctx["scan"], ctx["norm"]
    if cfg.sigma2 > 0:
        return cfg.sigma2 / norm**2, "config"
    if cfg.noise in ("auto", "scan") and scan.noise_std:
        return (float(scan.noise_std) / norm) ** 2, "scan"
    if cfg.noise == "scan":
        raise ConfigError("posterior.noise = 'scan' but the scan records no noise_std; use 'residual' or set posterior.sigma2")
    return float(ctx["dip"].sigma2), "residual"


def stage_posterior(ctx: RunContext, cfg) -> dict:
    """Build the posterior (σ², g-prior) and fit g by sample-based EM."""
    from dipuq.posterior.model import Posterior
    from dipuq.samplers import drive, iterate_em, make_sampler

    sigma2, source = _sigma2(ctx, cfg)
    post = Posterior(ctx["model"], ctx["A"], ctx["y"], sigma2=sigma2, g=cfg.g_init or 1.0, scale=ctx["scale"],
                     prior_center=cfg.prior_center)
    if not cfg.g_init:
        post = post.with_g(post.weight_scale_g())
    em = {"sigma2": sigma2, "sigma2_source": source, "g_trace": [post.g], "gamma_trace": [], "u_norm2": []}
    if cfg.em_rounds:
        scfg = ctx.config.sampler
        sampler = make_sampler(scfg.method if cfg.em_sampler == "same" else cfg.em_sampler, scfg)
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.gen("posterior")))
        from dipuq.samplers.distributed import em_hooks

        states = iterate_em(post, sampler, cfg.em_rounds, cfg.em_samples, seed=seed, rtol=cfg.em_rtol,
                            **em_hooks(ctx.dist))
        bar = ctx.tqdm(total=cfg.em_rounds, desc="EM for g", unit="round")

        def on_round(st):
            em["g_trace"].append(st.g_new)
            em["gamma_trace"].append(st.gamma)
            em["u_norm2"].append(st.u_norm2)
            bar.update(1)
            bar.set_postfix(g=f"{st.g_new:.3g}", gamma=f"{st.gamma:.3g}")

        try:
            post = drive(states, on_round)
        finally:
            bar.close()
    if ctx.is_main:
        post.save(ctx.path("posterior", "posterior.pt"))
        atomic_write_json(ctx.path("posterior", "em.json"), em)
    ctx["posterior"], ctx["em"] = post, em
    return {"g": post.g, "sigma2": sigma2, "sigma2_source": source}


def _moments_to(m, device):
    m.s1, m.s2 = m.s1.to(device), m.s2.to(device)
    if m.s4 is not None:
        m.s4 = m.s4.to(device)
    return m


def _extra_accumulators(ctx: RunContext, post) -> dict:
    """Streams the calibration needs besides the image samples: the prior draws J̃w₀ in image space
    and, with held-out angles, the posterior samples and prior draws seen through A_H."""
    from dipuq.samplers.moments import Moments

    shapes = {"prior": post.model.image_shape}
    if ctx["A_H"] is not None:
        shapes.update(heldout_post=ctx["A_H"].range_shape, heldout_prior=ctx["A_H"].range_shape)
    return {k: Moments(shape, fourth=False, device=ctx.device) for k, shape in shapes.items()}


def _extra_callback(ctx: RunContext, post, seed: int, acc: dict):
    from dipuq.samplers import prior_draws

    A_H = ctx["A_H"]

    def on_state(st):
        if not st.done:
            return
        with torch.no_grad():
            x0 = post.J(prior_draws(post, st.chains, seed))  # shape: (b, *image_shape)
            acc["prior"].update(x0)
            if A_H is not None:
                acc["heldout_post"].update(A_H(st.samples))
                acc["heldout_prior"].update(A_H(x0))

    return on_state


def stage_sampler(ctx: RunContext, cfg) -> dict:
    """Draw ``n_samples`` posterior samples, streaming their moments (and the prior draws' and the
    held-out projections' for the calibration); resumes batch by batch."""
    from dipuq.samplers.distributed import allreduce_moments, sample_distributed
    from dipuq.samplers import make_sampler
    from dipuq.samplers.moments import Moments

    post = ctx["posterior"]
    sampler = make_sampler(cfg.method, cfg)
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.gen("sampler")))
    partial = ctx.path("sampler", "partial.pt")
    moments, history, done = Moments(post.model.image_shape, device=ctx.device), [], 0
    extra = _extra_accumulators(ctx, post)
    try:
        st = load_torch(partial) if ctx.is_main and partial.exists() else None
    except DipuqError:  # a damaged in-stage checkpoint costs the batches it held, nothing else
        print(f"dipuq: {partial} is unreadable (truncated or corrupt); sampling from the first chain again",
              file=sys.stderr, flush=True)
        st = None
    if ctx.dist is not None and ctx.dist.is_distributed:
        st = ctx.dist.broadcast_object(st)  # every rank continues from rank 0's checkpoint
    if st is not None and st.get("seed") == seed and set(st.get("extra", {})) == set(extra):
        # chains are a pure function of (seed, chain): continue where we stopped
        moments = _moments_to(Moments.from_state_dict(st["moments"]), ctx.device)
        extra = {k: _moments_to(Moments.from_state_dict(v), ctx.device) for k, v in st["extra"].items()}
        history, done = st["history"], int(st["done"])
    bar = ctx.tqdm(total=cfg.n_samples, initial=done, desc=f"sampling ({cfg.method})", unit="sample")
    t0 = time.perf_counter()
    try:
        while done < cfg.n_samples:
            world = ctx.dist.world_size if ctx.dist is not None else 1
            chains = list(range(done, min(done + cfg.chains_per_batch * world, cfg.n_samples)))
            new = {k: Moments(m.shape, fourth=False, device=ctx.device) for k, m in extra.items()}
            res = sample_distributed(sampler, post, chains=chains, seed=seed, ctx=ctx.dist, moments=moments,
                                     callback=_extra_callback(ctx, post, seed, new))
            for k, m in new.items():
                extra[k].merge(allreduce_moments(m, ctx.dist) if ctx.dist is not None else m)
            history += [{k: to_jsonable(v) for k, v in h.items()} for h in res.history]
            done = chains[-1] + 1
            if ctx.is_main:
                save_torch({"seed": seed, "done": done, "moments": moments.state_dict(), "history": history,
                             "extra": {k: m.state_dict() for k, m in extra.items()}}, partial)
            bar.update(len(chains))
    finally:
        bar.close()
    residual = _sampler_residual(history, cfg.method)
    sampling = {"method": cfg.method, "n_samples": moments.n, "seed": seed, "history": history,
                "seconds_this_session": time.perf_counter() - t0,
                "processes": ctx.dist.world_size if ctx.dist is not None else 1,
                "final_relative_residual": residual, "solver": to_jsonable(sampler.describe(post))}
    if residual is not None and residual > SAMPLER_RESIDUAL_WARN:
        knob = "sampler.n_steps" if cfg.method == "sgd" else "sampler.cg_max_iter / sampler.cg_tol"
        what = ("an error bound of {:.2g} of the samples' data fit" if cfg.method == "sgd"
                else "{:.2g} of its initial residual norm").format(residual)
        ctx.log(f"dipuq: warning: the {cfg.method} sampler stopped at {what} (> {SAMPLER_RESIDUAL_WARN:g}): samples "
                f"are not converged and the std map is biased (sgd: too large); raise {knob} or "
                f"sampler.precond_max_rank")
    if ctx.is_main:
        save_torch(moments.state_dict(), ctx.path("sampler", "moments.pt"))
        save_torch({k: m.state_dict() for k, m in extra.items()}, ctx.path("sampler", "moments_extra.pt"))
        atomic_write_json(ctx.path("sampler", "sampling.json"), sampling)
        partial.unlink(missing_ok=True)
    ctx["moments"], ctx["sampling"], ctx["extra_moments"] = moments, sampling, extra
    return {"n_samples": moments.n, "final_relative_residual": residual}


def stage_calibrate(ctx: RunContext, cfg) -> dict:
    """Fit the variance model of the error bars on the held-out projections (:mod:`dipuq.maps.calibration`)."""
    from dipuq.maps.calibration import HeldoutPredictive, calibrate

    A_H, y_H = ctx["A_H"], ctx["y_H"]
    if not cfg.enabled or A_H is None:
        why = "calibration.enabled = false" if not cfg.enabled else "no held-out angles (data.holdout = 0)"
        out = {"enabled": False, "reason": why}
    else:
        extra, post = ctx["extra_moments"], ctx["posterior"]
        with torch.no_grad():
            resid = (y_H - A_H(ctx["dip"].recon.to(A_H.dtype))).double().cpu().numpy()
        groups = np.broadcast_to(np.arange(A_H.range_shape[0]).reshape(-1, *([1] * (len(A_H.range_shape) - 1))),
                                 A_H.range_shape)
        pred = HeldoutPredictive(resid, extra["heldout_post"].variance().cpu().numpy(),
                                 extra["heldout_prior"].variance().cpu().numpy(), post.sigma2, groups)
        t0 = time.perf_counter()
        model, report = calibrate(pred, cfg.terms, cfg.noise, cfg.tails)
        out = {"enabled": True, **report, "fit_seconds": time.perf_counter() - t0,
               "sigma2_source": "held-out fit" if cfg.noise == "fit" else ctx["em"].get("sigma2_source")}
    if ctx.is_main:
        atomic_write_json(ctx.path("calibrate", "calibration.json"), out)
    ctx["calibration"] = out
    keep = ("enabled", "reason", "model", "heldout_log_likelihood_raw", "heldout_log_likelihood_cv")
    return {k: out[k] for k in keep if k in out} | ({"scale": out["parameters"]["scale"]} if out.get("enabled") else {})


def calibrated_model(calibration: dict):
    """The fitted :class:`~dipuq.maps.calibration.VarianceModel` of a calibrate stage's record (None: off)."""
    from dipuq.maps.calibration import VarianceModel

    return VarianceModel(**calibration["parameters"]) if calibration.get("enabled") else None


def _sampler_residual(history: list[dict], method: str = "cg") -> float | None:
    """Worst (over batches) convergence measure of the sampler: for sgd the final error bound
    ||∇L||_{P⁻¹} / (σ⁻¹||AJ̃z||) (already relative to the sample), for cg the final/initial
    residual norm."""
    worst = None
    for h in history:
        trace = h.get("grad_norm") or []
        if method == "sgd" and trace:
            r = float(trace[-1])
        elif len(trace) >= 2 and trace[0] > 0:
            r = float(trace[-1]) / float(trace[0])
        else:
            continue
        worst = r if worst is None else max(worst, r)
    return worst


def stage_maps(ctx: RunContext, cfg) -> dict:
    """Predictive mean (the DIP reconstruction) and std maps (calibrated when the calibrate stage ran,
    the raw linearised-posterior std beside it), in the scan's units; the top-level NPY/TIFF files."""
    from dipuq.maps.uncertainty import UncertaintyMaps

    dip, moments, norm = ctx["dip"], ctx["moments"], ctx["norm"]
    model = calibrated_model(ctx["calibration"])
    raw_var = moments.variance()
    std_raw = raw_var.clamp_min(0).sqrt() * norm
    meta = {"mean": "dip reconstruction f(theta*)", "norm": norm, "df": None, "calibrated": model is not None}
    if model is not None:
        prior = ctx["extra_moments"]["prior"].variance()
        std = model.image_variance(raw_var, prior).clamp_min(0).sqrt() * norm
        meta.update(df=model.df, calibration=model.to_dict())
    else:
        std = std_raw
    se = moments.std_se() * norm * (std / std_raw.clamp_min(1e-30))  # MC error of the raw std, carried by the model
    maps = UncertaintyMaps(mean=(dip.recon * norm).detach().cpu().numpy().reshape(moments.shape),
                           std=std.cpu().numpy(), std_se=se.cpu().numpy(), n_samples=moments.n, meta=meta)
    maps.save(ctx.path("maps", "maps.npz"))
    recon, std32 = maps.mean.astype(np.float32), maps.std.astype(np.float32)
    atomic_save_npy(ctx.run.path("recon.npy"), recon)
    atomic_save_npy(ctx.run.path("std.npy"), std32)
    atomic_save_npy(ctx.run.path("std_raw.npy"), std_raw.cpu().numpy().astype(np.float32))
    if cfg.tiff:
        vs = ctx["scan"].geometry.voxel_size
        atomic_save_tiff(ctx.run.path("recon.tif"), recon, voxel_size=vs)
        atomic_save_tiff(ctx.run.path("std.tif"), std32, voxel_size=vs)
    ctx["maps"] = maps
    return {"shape": list(recon.shape), "mean_std": float(std32.mean()), "mean_std_raw": float(std_raw.mean())}


def stage_metrics(ctx: RunContext, cfg) -> dict:
    """Metrics against the reference, inside the region every angle sees (skipped without a reference);
    the held-out checks and the calibration, which need none, are recorded either way."""
    from dipuq.maps.metrics import psnr, ssim, uncertainty_metrics

    scan, maps = ctx["scan"], ctx["maps"]
    heldout_path = ctx.path("dip", "heldout.json")
    heldout = json.loads(heldout_path.read_text()) if heldout_path.exists() else {}
    cal = ctx["calibration"]
    m: dict[str, Any] = {}
    if scan.reference is not None:
        ref = scan.reference
        mask = ctx["coverage"] >= FULL_COVERAGE
        m = uncertainty_metrics(ref, maps.mean, maps.std, mask=mask, df=maps.meta.get("df"))
        fbp = ctx["fbp"].cpu().numpy()
        m["fbp_psnr"] = psnr(fbp[mask], ref[mask], data_range=float(ref[mask].max() - ref[mask].min()))
        if "ssim" in m:
            m["fbp_ssim"] = ssim(fbp, ref)
        err = (maps.mean.astype(np.float64) - ref)[mask]
        m["rmse"] = float(np.sqrt(np.mean(err ** 2)))
        m["mean_std"] = float(maps.std[mask].mean())
        m["mean_abs_error"] = float(np.abs(err).mean())
        if maps.meta.get("calibrated"):
            raw = uncertainty_metrics(ref, maps.mean, np.load(ctx.run.path("std_raw.npy")), mask=mask)
            m.update({f"raw_{k}": raw[k] for k in ("log_likelihood", "coverage_90", "calibration_error",
                                                   "spearman_std_abs_error")})
        m["covered_fraction"] = float(mask.mean())
    if maps.std_se is not None:
        m["std_mc_rel_error"] = float(np.mean(maps.std_se / np.maximum(maps.std, 1e-30)))
    m["n_samples"] = int(maps.n_samples)
    residual = ctx["sampling"].get("final_relative_residual")
    if residual is not None:
        m["sampler_relative_residual"] = float(residual)
    m.update({k: heldout[k] for k in ("heldout_mse_dip", "heldout_mse_fbp", "fbp_wins") if k in heldout})
    if cal.get("enabled"):
        m.update({"calibration_model": cal["model"], "calibration_scale": cal["parameters"]["scale"],
                  "calibration_df": cal["parameters"]["df"],
                  "heldout_log_likelihood_raw": cal["heldout_log_likelihood_raw"],
                  "heldout_log_likelihood_cv": cal["heldout_log_likelihood_cv"]})
        lv = cal["levels"]
        i90 = min(range(len(lv)), key=lambda i: abs(lv[i] - 0.9))
        m["heldout_coverage_90_raw"] = cal["coverage_raw"][i90]
        m["heldout_coverage_90"] = cal["coverage_calibrated"][i90]
    dip = ctx["dip"]
    m.update(dip_iterations=dip.iterations, dip_best_iteration=dip.best_iteration, dip_stop_reason=dip.stop_reason)
    atomic_write_json(ctx.run.path("metrics.json"), m)
    ctx["metrics"] = m
    return {k: m[k] for k in ("psnr", "coverage_90", "calibration_error", "heldout_coverage_90", "fbp_wins") if k in m}


def _figure_set(ctx: RunContext, cfg) -> dict[str, Any]:
    """name -> (caption, matplotlib figure) for every diagnostic that applies to this run."""
    from dipuq.show import viz
    scan, maps, dip = ctx["scan"], ctx["maps"], ctx["dip"]
    ref = scan.reference
    out = {}
    quantities = viz.derived_maps(maps.mean, maps.std, ref)
    out["slices"] = ("Orthogonal slices through the centre" if scan.ndim == 3 else "Reconstruction and error bars",
                     viz.orthoslices(quantities, zscore_limit=cfg.zscore_limit, voxel_size=scan.geometry.voxel_size))
    mask = ctx["coverage"] >= FULL_COVERAGE
    cal = ctx["calibration"]
    if cal.get("enabled"):
        lv = np.asarray(cal["levels"])
        fold = "out-of-fold, " if cal.get("coverage_out_of_fold") else ""
        out["heldout_reliability"] = (
            "Held-out projections: coverage of y_H by its predictive intervals (no reference needed)",
            viz.reliability_diagram([lv, lv], [cal["coverage_raw"], cal["coverage_calibrated"]],
                                    labels=["linearised posterior (raw)", f"calibrated ({fold}{cal['model']})"],
                                    title="Error bars checked on held-out projections",
                                    ylabel="fraction of held-out rays inside"))
    if ref is not None:
        err = maps.mean - ref
        nominal, empirical = viz.coverage_curve(err[mask], maps.std[mask], df=maps.meta.get("df"))
        curves, labels = [empirical], ["dipuq (calibrated)" if maps.meta.get("calibrated") else "dipuq"]
        if maps.meta.get("calibrated"):
            curves.append(viz.coverage_curve(err[mask], np.load(ctx.run.path("std_raw.npy"))[mask])[1])
            labels.append("linearised posterior (raw)")
        out["calibration"] = ("Reliability diagram: coverage of x̂ ± qσ", viz.reliability_diagram(
            [nominal] * len(curves), curves, labels=labels))
        rho = (ctx["metrics"] or {}).get("spearman_std_abs_error")
        out["std_vs_error"] = ("Posterior std against |error|, per voxel", viz.std_error_hexbin(maps.std, np.abs(err), spearman=rho))
    if not mask.all():
        out["coverage"] = ("Ray coverage: the region every angle sees", viz.coverage_map(ctx["coverage"]))
    misfit = dip.history.get("misfit") or dip.history.get("loss")
    if misfit:
        trace_path = ctx.path("dip", "psnr_trace.json")
        trace = json.loads(trace_path.read_text()) if trace_path.exists() else {}
        noise = (float(scan.noise_std) / ctx["norm"]) ** 2 if scan.noise_std else None
        out["dip_loss"] = ("Deep image prior fit", viz.loss_curve(
            np.arange(len(misfit)), misfit, best_iteration=dip.best_iteration, noise_level=noise,
            heldout=dip.history.get("val"),
            psnr=(trace["iteration"], trace["psnr"]) if trace.get("psnr") else None))
    sampling = ctx["sampling"]
    curves = {}
    for i, h in enumerate(sampling.get("history", [])[:4]):
        gn = np.asarray(h.get("grad_norm") or [], dtype=np.float64)
        if len(gn) > 1 and np.isfinite(gn).all() and gn[0] > 0:
            rel = gn if sampling["method"] in ("cg", "sgd") else gn / gn[0]
            curves[f"chains {h['chains'][0]}–{h['chains'][-1]}"] = (np.arange(1, len(gn) + 1), rel)
    if curves:
        what = {"cg": "CG relative residual", "sgd": "error bound (share of data fit)"}.get(
            sampling["method"], "||∇L(z_t)|| / ||∇L(z_0)||")
        out["sampler"] = (f"Sampler convergence ({sampling['method']})", viz.curves_figure(
            curves, xlabel="solver step", ylabel=f"{what}\n(mean over chains)",
            title=f"Posterior sampler ({sampling['method']}): convergence per batch of chains"))
    em = ctx["em"]
    if len(em.get("g_trace", [])) > 1:
        out["em"] = ("EM for the prior variance g", viz.em_trace(em["g_trace"], gamma=em["gamma_trace"]))
    return out


def stage_figures(ctx: RunContext, cfg) -> dict:
    """PNG figures in ``figures/``."""
    from dipuq.show import viz
    if not cfg.figures:
        return {"skipped": "output.figures = false"}
    written = {}
    for name, (caption, fig) in _figure_set(ctx, cfg).items():
        viz.save_figure(fig, ctx.run.path("figures", f"{name}.png"), dpi=cfg.dpi)
        written[name] = caption
    atomic_write_json(ctx.path("figures", "captions.json"), written)
    return {"files": [f"figures/{n}.png" for n in written]}


def _dip_unfinished(dip) -> bool:
    """Whether a validation-stopped fit hit its iteration cap or time limit before the held-out loss
    stopped improving (its kept iterate lies within the patience window of the end)."""
    if dip.stop_reason not in ("iterations", "time") or not dip.history.get("val"):
        return False
    from dipuq.dip.fit import DipConfig, validation_window

    cfg = DipConfig.from_dict(dip.config)
    return dip.iterations - 1 - dip.best_iteration < validation_window(cfg, dip.best_iteration)


def _run_warnings(ctx: RunContext) -> list[str]:
    """What the report must put first: the FBP beating the DIP, an unfinished fit, unconverged samples."""
    out = []
    path = ctx.path("dip", "heldout.json")
    check = json.loads(path.read_text()) if path.exists() else {}
    if check.get("fbp_wins"):
        out.append(check.get("message", "the FBP/FDK explains the held-out projections better than the DIP"))
    dip = ctx["dip"]
    if _dip_unfinished(dip):
        out.append(f"the DIP fit was stopped by its {'iteration cap' if dip.stop_reason == 'iterations' else 'time limit'} "
                   f"at iteration {dip.iterations} while the held-out loss was still falling (kept iterate "
                   f"{dip.best_iteration}): it may be unfinished; raise dip.iterations / dip.max_seconds")
    residual = ctx["sampling"].get("final_relative_residual")
    if residual is not None and residual > SAMPLER_RESIDUAL_WARN:
        out.append(f"the sampler stopped at a convergence measure of {residual:.2g} (> {SAMPLER_RESIDUAL_WARN:g}): "
                   "the std map is biased")
    return out


def stage_report(ctx: RunContext, cfg) -> dict:
    """The self-contained ``report.html``."""
    from dipuq.show import viz
    from dipuq.show.report import write_report

    if not cfg.report:
        return {"skipped": "output.report = false"}
    scan, maps = ctx["scan"], ctx["maps"]
    figures = {}
    captions = ctx.path("figures", "captions.json")
    if cfg.figures and captions.exists():  # reuse the PNGs the figures stage wrote
        for name, caption in json.loads(captions.read_text()).items():
            if name != "slices":
                figures[caption] = ctx.run.path("figures", f"{name}.png").read_bytes()
    else:
        for name, (caption, fig) in _figure_set(ctx, cfg).items():
            if name != "slices":
                figures[caption] = viz.figure_png(fig, dpi=cfg.dpi)
    prov_path = ctx.run.path("provenance.json")
    provenance = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    sub = (f"{scan.geometry.describe()} · {ctx['sampling']['method']} sampler, {maps.n_samples} posterior samples · "
           f"run {ctx.run.root.name}")
    write_report(ctx.run.path("report.html"), maps.mean, maps.std, reference=scan.reference, metrics=ctx["metrics"],
                 figures=figures, config_text=dumps_config(ctx.config), provenance=provenance,
                 title=f"dipuq report: {scan.name or 'reconstruction'}", subtitle=sub,
                 n_slices=cfg.report_slices, zscore_limit=cfg.zscore_limit, warnings=_run_warnings(ctx))
    return {"file": "report.html"}


#: stage name -> (function, config section it receives)
STAGE_FUNCS: dict[str, tuple[Callable[[RunContext, Any], dict], str]] = {
    "scan": (stage_scan, "data"),
    "fbp": (stage_fbp, "operator"),
    "dip": (stage_dip, "dip"),
    "linearise": (stage_linearise, "linearise"),
    "posterior": (stage_posterior, "posterior"),
    "sampler": (stage_sampler, "sampler"),
    "calibrate": (stage_calibrate, "calibration"),
    "maps": (stage_maps, "output"),
    "metrics": (stage_metrics, "output"),
    "figures": (stage_figures, "output"),
    "report": (stage_report, "output"),
}


STAGE_TITLES = {
    "scan": "scan: preprocessing the projections, choosing the held-out angles",
    "fbp": "fbp: analytic reconstruction (FBP / FDK), data scale, ray coverage",
    "dip": "dip: fitting the deep image prior",
    "linearise": "linearise: Jacobian at the fit and g-prior scales",
    "posterior": "posterior: noise level and EM for the prior variance g",
    "sampler": "sampler: drawing posterior samples",
    "calibrate": "calibrate: fitting the error bars to the held-out projections",
    "maps": "maps: reconstruction and std volumes (NPY, TIFF)",
    "metrics": "metrics: comparison with the reference",
    "figures": "figures: PNG slices and diagnostics",
    "report": "report: report.html",
}
_CLEANUP = {"dip": ("fit.ckpt",)}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _request(scan: Scan, config: Config, seed: int) -> dict:
    return {"scan": scan_digest(scan), "scan_name": scan.name, "seed": int(seed), "config": config_digest(config_to_dict(config))}


#: config sections a stage reads besides its own (EM runs the sampler)
_ALSO_READS = {"posterior": ("sampler",)}


def _first_stage_reading(sections: set[str]) -> str:
    """The earliest stage whose result depends on any of ``sections`` (unknown ones: the first)."""
    for s in STAGES:
        if {STAGE_FUNCS[s][1], *_ALSO_READS.get(s, ())} & sections:
            return s
    return STAGES[0]


def _check_same_request(run: RunDir, request: dict, config: Config) -> list[str]:
    """Raise a one-line ConfigError if ``run`` holds a different request.

    A config change that only affects stages which never finished (a failed or interrupted run
    rerun with a corrected config) is accepted: the finished stages before the first affected
    one are returned, to be carried over under the new request.
    """
    try:
        old = json.loads(run.path("stages", REQUEST_FILE).read_text())
    except (OSError, ValueError):
        old = None
    if old is None:
        if run.finished_stages() or run.path(CONFIG_FILE).exists():
            raise DipuqError(f"{run.root} holds a dipuq run without a readable request; rerun with --force to start over")
        if run.exists():
            raise DipuqError(f"{run.root} is not empty and is not a dipuq run directory; choose another --out")
        return []
    if old == request:
        return []
    if {k: v for k, v in old.items() if k != "config"} == {k: v for k, v in request.items() if k != "config"}:
        try:
            diff = diff_configs(load_config(run.path(CONFIG_FILE)), config)
        except DipuqError:
            diff = None
        if diff:
            first = _first_stage_reading({line.split(".", 1)[0].split(":", 1)[0] for line in diff})
            finished = run.finished_stages()
            if all(STAGES.index(s) < STAGES.index(first) for s in finished):
                return finished  # only never-finished stages see the change
    why = []
    if old.get("scan") != request["scan"]:
        why.append(f"a different scan ({old.get('scan_name') or old.get('scan')})")
    if old.get("seed") != request["seed"]:
        why.append(f"seed {old.get('seed')} (now {request['seed']})")
    if old.get("config") != request["config"]:
        try:
            diff = diff_configs(load_config(run.path(CONFIG_FILE)), config)
        except DipuqError:
            diff = []
        why.append("a different config" + (f" ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''})" if diff else ""))
    raise ConfigError(f"run directory {run.root} was made with {', '.join(why)}; rerun with --force to start over, "
                      "or choose another --out")


def _provenance(ctx: RunContext, backend: str | None, status: str, started: float, resumed: str | None) -> dict:
    return {
        "dipuq_version": __version__,
        "status": status,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seed": ctx.seed,
        "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or platform.machine(),
        "backend": backend,
        "threads": torch.get_num_threads(),
        "resumed_from": resumed,
        "git_commit": _git_commit(),
        "versions": _versions(),
        "platform": platform.platform(),
        "scan": {"name": ctx.input_scan.name if ctx.input_scan is not None else None,
                 "digest": scan_digest(ctx.input_scan) if ctx.input_scan is not None else None,
                 "source": (ctx.input_scan.meta or {}).get("source") if ctx.input_scan is not None else None},
        "timings_s": dict(ctx.timings),
        "total_s": float(sum(ctx.timings.values())),
    }


def run_pipeline(
    scan: Scan,
    config: Config | None = None,
    run_dir: str | os.PathLike = "run",
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    backend: str | None = None,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Run (or resume) the whole job on ``scan`` and write the run directory ``run_dir``.

    Parameters
    ----------
    scan : the measured scan (:class:`dipuq.data.Scan`), before ``[data]`` preprocessing
    config : the :class:`~dipuq.run.config.Config` (default: all defaults)
    run_dir : output folder; if it holds a run of the same request, finished stages are reused
    seed : run seed; each stage derives its own generator from it
    device : "cpu", "cuda" or "auto"
    backend : ray-transform backend; overrides ``config.operator.backend`` when given
    progress : progress bars and stage lines on stderr
    force : discard an existing run in ``run_dir`` first
    log : where stage lines go (default: stderr when ``progress``, else nowhere)
    """
    from dipuq.samplers.ranks import init_distributed

    with init_distributed(device=device if isinstance(device, torch.device) else (device or "auto")) as dist:
        if not dist.is_main:
            progress, log = False, (lambda msg: None)
        if dist.is_distributed:
            device = dist.device
        lock = RunLock(run_dir) if dist.is_main else contextlib.nullcontext()
        with lock:  # one run per directory: a second process fails at once, naming this PID
            if getattr(lock, "stale_pid", None) is not None and progress:
                print(f"dipuq: taking over the stale lock of PID {lock.stale_pid} (no longer running) on {run_dir}",
                      file=sys.stderr, flush=True)
            return _run_pipeline(scan, config, run_dir, seed, device, backend, progress, force, log, dist)


# Stages every rank runs under torchrun; the others run on rank 0 only (samples are sharded).
_ALL_RANKS = ("posterior", "sampler")


def _run_pipeline(scan, config, run_dir, seed, device, backend, progress, force, log, dist) -> RunResult | None:
    config = config or Config()
    if backend is not None:
        config = config.replace({"operator.backend": backend})
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    from dipuq.operators.ray import BACKENDS

    if config.operator.backend != "auto" and config.operator.backend not in BACKENDS:
        raise ConfigError(f"unknown ray-transform backend {config.operator.backend!r}: use auto or one of "
                          f"{', '.join(BACKENDS)}")
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    run = RunDir(run_dir, STAGES)
    if run.root.exists() and not run.root.is_dir():
        raise DipuqError(f"--out {run.root} exists and is not a folder")
    d = config.data
    if not (d.angles or d.crop_cols or d.crop_rows or d.vol_xy or d.bin > 1):  # else checked after preprocessing
        _check_memory(scan, config.operator.backend, dev)
    request = _request(scan, config, seed)
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]

    def prepare_run_dir():
        carried = []
        if force:
            run.clear()
        else:
            carried = _check_same_request(run, request, config)
        run.create()
        for s in carried:  # finished stages the config change does not touch keep their results
            run.rekey(s, key)
        atomic_write_text(run.path(CONFIG_FILE), dumps_config(config))
        atomic_write_json(run.path("stages", REQUEST_FILE), request)
        warn = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - damage is reported even with --quiet
        return run.trusted_prefix([s for s in STAGES if run.is_done(s, key)], warn)  # checksums verified

    done = dist.on_main(prepare_run_dir)  # only rank 0 touches the run directory
    ctx = RunContext(run, config, seed, dev, progress, input_scan=scan, log=log, dist=dist)
    first_todo = next((s for s in STAGES if s not in done), None)
    resumed = None
    if done and first_todo is not None:
        resumed = first_todo
        log(f"dipuq: resuming {run.root}: {', '.join(s for s in STAGES[:STAGES.index(first_todo)])} already done; "
            f"continuing from '{first_todo}'")
    elif first_todo is None:
        log(f"dipuq: {run.root} is complete (all stages done); nothing to do (use --force to recompute)")
    for s in STAGES:
        m = run.marker(s)
        if m is not None and s in done:
            ctx.timings[s] = float(m.get("seconds", 0.0))

    started = time.time()
    backend_used = None
    todo = STAGES[STAGES.index(first_todo):] if first_todo is not None else ()
    if ctx.is_main:
        for s in todo:  # forget markers of everything we will (re)run; partial work of the same request stays
            (run.stage_dir(s) / run.MARKER).unlink(missing_ok=True)
    synced = not dist.is_distributed
    for i, name in enumerate(todo):
        fn, section = STAGE_FUNCS[name]
        if not synced and name in _ALL_RANKS:
            _share_with_ranks(ctx, todo)
            synced = True
        if not ctx.is_main and name not in _ALL_RANKS:
            if STAGES.index(name) > STAGES.index(_ALL_RANKS[-1]):
                break  # rank 0 alone writes maps, metrics, figures and the report
            continue
        log(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {STAGE_TITLES[name]}")
        t0 = time.perf_counter()
        before = run.snapshot() if ctx.is_main else None
        try:
            summary = fn(ctx, getattr(config, section))
        except torch.cuda.OutOfMemoryError as exc:  # one line naming the size and the key that lowers it
            from dipuq.devices import oom_error

            raise oom_error(exc, stage=name, what=_volume_words(ctx)) from None
        ctx.timings[name] = time.perf_counter() - t0
        if not ctx.is_main:
            continue
        run.mark_done(name, key, before=before, exclude=_CLEANUP.get(name, ()), seconds=ctx.timings[name],
                      summary=to_jsonable(summary or {}))
        for leftover in _CLEANUP.get(name, ()):  # resume-within-stage files, obsolete once the stage is done
            run.stage_dir(name).joinpath(leftover).unlink(missing_ok=True)
        if "A" in ctx.values:
            backend_used = ctx.values["A"].backend
        if name != "report":  # the report embeds provenance: keep it current before the report stage
            atomic_write_json(run.path("provenance.json"), _provenance(ctx, backend_used or config.operator.backend,
                                                                      "running", started, resumed))
    if not ctx.is_main:
        return None
    if backend_used is None:
        try:
            backend_used = json.loads(run.path("provenance.json").read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            backend_used = config.operator.backend
    atomic_write_json(run.path("provenance.json"), _provenance(ctx, backend_used, "complete", started, resumed))
    recon = np.load(run.path("recon.npy"))
    std = np.load(run.path("std.npy"))
    metrics = json.loads(run.path("metrics.json").read_text()) if run.path("metrics.json").exists() else None
    if todo:
        total = sum(ctx.timings.get(s, 0.0) for s in todo)
        log(f"dipuq: done in {total:.1f} s -> {run.root}" + ("/report.html" if config.output.report else ""))
    return RunResult(run.root, recon, std, metrics, dict(ctx.timings), resumed)


def _volume_words(ctx: RunContext) -> str | None:
    """'volume 128x128x128, 91 projections' for error messages, if the scan is known."""
    scan = ctx.values.get("scan", ctx.input_scan)
    if scan is None:
        return None
    g = scan.geometry
    return f"volume {'x'.join(str(n) for n in g.vol_shape)}, {g.n_angles} projections"


def _share_with_ranks(ctx: RunContext, todo) -> None:
    """Send rank 0's scan, DIP fit and g-prior scales (and a finished posterior) to every rank."""
    names = ["scan", "split", "norm", "dip", "scale"] + (["posterior"] if "posterior" not in todo else [])

    def pack():
        vals = {k: ctx[k] for k in names}
        if "posterior" in vals:
            vals["posterior"] = vals["posterior"].state_dict()
        return vals

    vals = ctx.dist.on_main(pack)
    if ctx.is_main:
        return
    post_state = vals.pop("posterior", None)
    vals["scale"] = vals["scale"].to(ctx.device)
    ctx.values.update(vals)
    if post_state is not None:
        from dipuq.posterior.model import Posterior

        ctx["posterior"] = Posterior(ctx["model"], ctx["A"], post_state["y"], sigma2=post_state["sigma2"],
                                     g=post_state["g"], scale=post_state["scale"].to(ctx.device),
                                     prior_center=post_state["prior_center"])
