"""The whole job as resumable stages: scan → FBP/FDK → DIP → linearise → EM → sampler → calibrate
→ maps → metrics → figures → report (:data:`dipuq.run.stages.STAGES`).

Each stage receives its config section whole, reads earlier stages' outputs through the
:class:`~dipuq.run.context.RunContext` (loaded lazily from their checkpoints when the run
resumes), and writes its own checkpoint files under ``RUN/stages/NN_name/`` before its
``done.json`` marker. :func:`run_pipeline` is the driver: it decides what an existing run
directory may reuse (:mod:`dipuq.run.resume`: same scan and seed; a config change recomputes
only the stages that read a changed section and those after them), skips finished stages
(saying so), times every stage into ``provenance.json`` and shows progress bars. The algorithms
it calls are generators that never print; everything printed comes from here.

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
import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from dipuq._io import atomic_write_json, atomic_write_text, to_jsonable
from dipuq.data.scan import Scan
from dipuq.devices import oom_error
from dipuq.errors import ConfigError, DipuqError
from dipuq.operators.ray import BACKENDS
from dipuq.posterior.model import Posterior
from dipuq.run import provenance
from dipuq.run.config import Config, dumps_config
from dipuq.run.context import RunContext, RunResult, resolve_device
from dipuq.run.resume import CONFIG_FILE, REQUEST_FILE, plan_reuse
from dipuq.run.rundir import RunDir, RunLock
from dipuq.run.stages import STAGE_NAMES, STAGES, check_memory, loaders
from dipuq.samplers.ranks import init_distributed

__all__ = ["run_pipeline"]


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


def _run_pipeline(scan, config, run_dir, seed, device, backend, progress, force, log, dist) -> RunResult | None:
    config = config or Config()
    if backend is not None:
        config = config.replace({"operator.backend": backend})
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if config.operator.backend != "auto" and config.operator.backend not in BACKENDS:
        raise ConfigError(f"unknown ray-transform backend {config.operator.backend!r}: use auto or one of "
                          f"{', '.join(BACKENDS)}")
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    run = RunDir(run_dir, STAGE_NAMES)
    if run.root.exists() and not run.root.is_dir():
        raise DipuqError(f"--out {run.root} exists and is not a folder")
    d = config.data
    if not (d.angles or d.crop_cols or d.crop_rows or d.vol_xy or d.bin > 1):  # else checked after preprocessing
        check_memory(scan, config.operator.backend, dev)
    request = provenance.request(scan, config, seed)
    key = provenance.request_key(request)
    done = dist.on_main(lambda: _prepare_run_dir(run, request, key, config, force, log))  # only rank 0 writes
    ctx = RunContext(run, config, seed, dev, progress, input_scan=scan, log=log, dist=dist, loaders=loaders())
    todo, resumed = _plan(ctx, done)
    started = time.time()
    backend_used = _run_stages(ctx, todo, key, started, resumed)
    if not ctx.is_main:
        return None
    return _finish(ctx, todo, backend_used, started, resumed)


def _prepare_run_dir(run: RunDir, request: dict, key: str, config: Config, force: bool, log) -> list[str]:
    """Clear (``force``) or check the run directory, carry over what the request may reuse, write the
    new request; return the finished stages whose files verify (a prefix of the pipeline)."""
    carried = []
    if force:
        run.clear()
    else:
        reuse = plan_reuse(run, STAGES, request, config)
        if reuse.describe():
            log(reuse.describe())
        carried = reuse.carried
    run.create()
    stale = run.remove_stale()
    if stale:
        log(f"dipuq: removed stage folders of another dipuq version: {', '.join(stale)}")
    for s in carried:  # finished stages the config change does not touch keep their results
        run.rekey(s, key)
    atomic_write_text(run.path(CONFIG_FILE), dumps_config(config))
    atomic_write_json(run.path("stages", REQUEST_FILE), request)
    warn = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - damage is reported even with --quiet
    return run.trusted_prefix([s for s in STAGE_NAMES if run.is_done(s, key)], warn)  # checksums verified


def _plan(ctx: RunContext, done: list[str]) -> tuple[tuple[str, ...], str | None]:
    """The stages still to run (saying what is reused) and the stage a resumed run restarts at."""
    run = ctx.run
    first_todo = next((s for s in STAGE_NAMES if s not in done), None)
    resumed = None
    if done and first_todo is not None:
        resumed = first_todo
        ctx.log(f"dipuq: resuming {run.root}: {', '.join(STAGE_NAMES[:STAGE_NAMES.index(first_todo)])} already done; "
                f"continuing from '{first_todo}'")
    elif first_todo is None:
        ctx.log(f"dipuq: {run.root} is complete (all stages done); nothing to do (use --force to recompute)")
    for s in STAGE_NAMES:
        m = run.marker(s)
        if m is not None and s in done:
            ctx.timings[s] = float(m.get("seconds", 0.0))
    todo = STAGE_NAMES[STAGE_NAMES.index(first_todo):] if first_todo is not None else ()
    if ctx.is_main:
        for s in todo:  # forget markers of everything we will (re)run; partial work of the same request stays
            (run.stage_dir(s) / run.MARKER).unlink(missing_ok=True)
    return todo, resumed


def _run_stages(ctx: RunContext, todo, key: str, started: float, resumed: str | None) -> str | None:
    """Run the stages ``todo`` in order (rank 0 alone, except the all-ranks ones); return the backend used."""
    run, config = ctx.run, ctx.config
    dist = ctx.dist
    backend_used = None
    synced = not dist.is_distributed
    last_shared = max(i for i, s in enumerate(STAGES) if s.all_ranks)
    for name in todo:
        st = STAGES[STAGE_NAMES.index(name)]
        if not synced and st.all_ranks:
            _share_with_ranks(ctx, todo)
            synced = True
        if not ctx.is_main and not st.all_ranks:
            if STAGE_NAMES.index(name) > last_shared:
                break  # rank 0 alone writes maps, metrics, figures and the report
            continue
        ctx.log(f"[{STAGE_NAMES.index(name) + 1}/{len(STAGES)}] {st.title}")
        t0 = time.perf_counter()
        before = run.snapshot() if ctx.is_main else None
        try:
            summary = st.run(ctx, getattr(config, st.section))
        except torch.cuda.OutOfMemoryError as exc:  # one line naming the size and the key that lowers it
            raise oom_error(exc, stage=name, what=_volume_words(ctx)) from None
        ctx.timings[name] = time.perf_counter() - t0
        if not ctx.is_main:
            continue
        run.mark_done(name, key, before=before, exclude=st.cleanup, seconds=ctx.timings[name],
                      summary=to_jsonable(summary or {}))
        for leftover in st.cleanup:  # resume-within-stage files, obsolete once the stage is done
            run.stage_dir(name).joinpath(leftover).unlink(missing_ok=True)
        if "A" in ctx.values:
            backend_used = ctx.values["A"].backend
        if name != "report":  # the report embeds provenance: keep it current before the report stage
            atomic_write_json(run.path("provenance.json"), provenance.record(
                ctx, backend_used or config.operator.backend, "running", started, resumed))
    return backend_used


def _finish(ctx: RunContext, todo, backend_used: str | None, started: float, resumed: str | None) -> RunResult:
    """Write the final provenance and return the run's volumes and metrics."""
    run = ctx.run
    if backend_used is None:
        try:
            backend_used = json.loads(run.path("provenance.json").read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            backend_used = ctx.config.operator.backend
    atomic_write_json(run.path("provenance.json"), provenance.record(ctx, backend_used, "complete", started, resumed))
    recon = np.load(run.path("recon.npy"))
    std = np.load(run.path("std.npy"))
    metrics = json.loads(run.path("metrics.json").read_text()) if run.path("metrics.json").exists() else None
    if todo:
        total = sum(ctx.timings.get(s, 0.0) for s in todo)
        ctx.log(f"dipuq: done in {total:.1f} s -> {run.root}" + ("/report.html" if ctx.config.output.report else ""))
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
        ctx["posterior"] = Posterior(ctx["model"], ctx["A"], post_state["y"], sigma2=post_state["sigma2"],
                                     g=post_state["g"], scale=post_state["scale"].to(ctx.device),
                                     prior_center=post_state["prior_center"])
