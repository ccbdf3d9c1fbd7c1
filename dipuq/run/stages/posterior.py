"""Stages ``posterior`` and ``sampler``: the noise level and EM for the prior variance g, then the
posterior samples, streamed into moments (with the prior draws and held-out projections the
calibration needs), resumable batch by batch."""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from dipuq._io import atomic_write_json, load_torch, save_torch, to_jsonable
from dipuq.errors import DipuqError
from dipuq.posterior.model import Posterior
from dipuq.posterior.noise import decide_sigma2
from dipuq.run.context import RunContext, Stage
from dipuq.samplers import drive, iterate_em, make_sampler, prior_draws
from dipuq.samplers.base import SAMPLER_RESIDUAL_WARN
from dipuq.samplers.distributed import allreduce_moments, em_hooks, sample_distributed
from dipuq.samplers.moments import Moments

__all__ = ["POSTERIOR", "SAMPLER", "sampler_residual"]




def _sigma2(ctx: RunContext, cfg) -> tuple[float, str]:
    """σ² of the fitted projections in fit units (the scan's units / norm²), and where it came from."""
    return decide_sigma2(cfg, residual=ctx["dip"].residual_sigma2, noise_std=ctx["scan"].noise_std, norm=ctx["norm"])


def stage_posterior(ctx: RunContext, cfg) -> dict:
    """Build the posterior (σ², g-prior) and fit g by sample-based EM."""
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
        bar = ctx.tqdm(total=cfg.em_rounds, desc="EM for g", unit="round")
        states = iterate_em(post, sampler, cfg.em_rounds, cfg.em_samples, seed=seed, rtol=cfg.em_rtol,
                            step_callback=step_progress(bar, cfg.em_samples), **em_hooks(ctx.dist))

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
    shapes = {"prior": post.model.image_shape}
    if ctx["A_H"] is not None:
        shapes.update(heldout_post=ctx["A_H"].range_shape, heldout_prior=ctx["A_H"].range_shape)
    return {k: Moments(shape, fourth=False, device=ctx.device) for k, shape in shapes.items()}


def _extra_callback(ctx: RunContext, post, seed: int, acc: dict):
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


def step_progress(bar, em_samples: int | None = None, every_s: float = 1.0):
    """A solver-step callback that shows where a batch or an EM round is on ``bar`` (at most once
    per ``every_s``): the iteration and the current error measure (sgd: error bound of the
    samples' data fit; cg: relative residual), worst over the batch's chains; with ``em_samples``
    also whether the round is solving its mean or its samples."""
    last = [-math.inf]

    def on_step(st):
        if st.done or st.grad_norm is None:
            return
        now = time.monotonic()
        if now - last[0] < every_s:
            return
        last[0] = now
        what = "" if em_samples is None else ("mean, " if list(st.chains) == [-1] else f"{em_samples} samples, ")
        bar.set_postfix_str(f"{what}iteration {st.step}, error {float(st.grad_norm.max()):.2g}")

    return on_step


def _with_progress(first, second):
    def both(st):
        first(st)
        second(st)

    return both


def stage_sampler(ctx: RunContext, cfg) -> dict:
    """Draw ``n_samples`` posterior samples, streaming their moments (and the prior draws' and the
    held-out projections' for the calibration); resumes batch by batch."""
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
        if done < cfg.n_samples:  # minutes on 3D problems: say so rather than sit at 0/n
            bar.set_postfix_str("building the preconditioner")
            sampler.prepare(post)
        steps = step_progress(bar)
        while done < cfg.n_samples:
            world = ctx.dist.world_size if ctx.dist is not None else 1
            chains = list(range(done, min(done + cfg.chains_per_batch * world, cfg.n_samples)))
            new = {k: Moments(m.shape, fourth=False, device=ctx.device) for k, m in extra.items()}
            res = sample_distributed(sampler, post, chains=chains, seed=seed, ctx=ctx.dist, moments=moments,
                                     callback=_with_progress(_extra_callback(ctx, post, seed, new), steps))
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
    residual = sampler_residual(history, cfg.method)
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


def sampler_residual(history: list[dict], method: str = "cg") -> float | None:
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


def _load_posterior(ctx):
    return Posterior.load(ctx.path("posterior", "posterior.pt"), ctx["model"], ctx["A"])


def _load_em(ctx):
    return json.loads(ctx.path("posterior", "em.json").read_text())


def _load_moments(ctx):
    return Moments.from_state_dict(load_torch(ctx.path("sampler", "moments.pt")))


def _load_extra_moments(ctx):
    path = ctx.path("sampler", "moments_extra.pt")
    if not path.exists():
        return {}
    return {k: Moments.from_state_dict(v) for k, v in load_torch(path).items()}


def _load_sampling(ctx):
    return json.loads(ctx.path("sampler", "sampling.json").read_text())


POSTERIOR = Stage("posterior", "posterior: noise level and EM for the prior variance g", stage_posterior, "posterior",
                  reads=("sampler",),  # EM draws its samples with the configured sampler
                  outputs={"posterior": _load_posterior, "em": _load_em}, all_ranks=True)
SAMPLER = Stage("sampler", "sampler: drawing posterior samples", stage_sampler, "sampler",
                outputs={"moments": _load_moments, "extra_moments": _load_extra_moments, "sampling": _load_sampling},
                all_ranks=True)
