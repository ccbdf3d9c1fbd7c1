"""Stages ``dip``, ``linearise`` and ``refit``: the deep image prior fit (stopped by the held-out
angles and checked against the FBP on them), the linearisation with its g-prior scales, and — once
the held-out angles have done their work (the stop, the FBP check, the error-bar calibration) — the
refit of the DIP on every angle, held-out ones included, which gives the final reconstruction."""

from __future__ import annotations

import dataclasses

import torch

from dipuq._io import atomic_write_json, load_torch, save_torch
from dipuq.dip.driver import DipResult, run_dip
from dipuq.dip.fit import DipConfig, validation_window
from dipuq.dip.networks import UNet
from dipuq.errors import DipuqError
from dipuq.maps.metrics import psnr
from dipuq.posterior.linearise import LinearisedModel
from dipuq.posterior.gprior import gprior_scale
from dipuq.run.context import RunContext, Stage
from dipuq.threads import ThreadGovernor

__all__ = ["DIP", "LINEARISE", "REFIT", "dip_unfinished"]


def _dip_config(cfg, norm: float):
    """The ``[dip]`` section in fit units (a known noise variance is divided by norm²)."""
    return dataclasses.replace(cfg, sigma2=cfg.sigma2 / norm**2) if cfg.sigma2 else cfg


def stage_dip(ctx: RunContext, cfg) -> dict:
    """Fit the deep image prior on the fitted angles, stopped by the held-out ones (resumes a partly
    finished fit from its own checkpoint); compare it with the FBP on the held-out projections."""
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
        callbacks.append(ThreadGovernor(log=ctx.log))
    validation = (ctx["A_H"], ctx["y_H"]) if ctx["split"].has_heldout else None
    result = run_dip(net, A, y, _dip_config(cfg, norm), x_input=x_input, generator=gen,
                     checkpoint=ctx.path("dip", "fit.ckpt"), callbacks=callbacks, progress=ctx.progress,
                     validation=validation)
    atomic_write_json(ctx.path("dip", "psnr_trace.json"), psnr_trace)
    if result.tv:
        atomic_write_json(ctx.path("dip", "tv.json"), result.tv)
        ctx.log(f"dipuq: TV weight chosen on the held-out angles: {result.tv['lam']:g} "
                f"(DIP gamma {result.config['gamma']:g})")
    result.save(ctx.path("dip", "dip.pt"))
    ctx["dip"], ctx["net"] = result, net
    check = _heldout_check(ctx, result, cfg)
    check["unfinished"] = dip_unfinished(result)
    if check["unfinished"]:
        ctx.log(f"dipuq: warning: the DIP reached dip.{'iterations' if result.stop_reason == 'iterations' else 'max_seconds'}"
                f" while its held-out loss was still improving (kept iterate {result.best_iteration} of "
                f"{result.iterations}): the fit may be unfinished")
    atomic_write_json(ctx.path("dip", "heldout.json"), check)
    tv = {"tv_lam": result.tv["lam"], "gamma": result.config["gamma"]} if result.tv else {}
    return {"iterations": result.iterations, "best_iteration": result.best_iteration, "stop_reason": result.stop_reason,
            "residual_sigma2": result.residual_sigma2, **tv, **{k: v for k, v in check.items() if k != "message"}}


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
    if dip.tv:  # the TV least squares at the chosen weight, on the same held-out rows
        out["heldout_mse_tv"] = float(dip.tv["heldout_mse"])
        out["tv_wins"] = out["heldout_mse_tv"] < dip_mse
        if out["tv_wins"]:
            ctx.log(f"dipuq: note: TV least squares at the chosen weight explains the held-out projections better "
                    f"than the DIP ({out['heldout_mse_tv']:.3g} vs {dip_mse:.3g})")
    if out["fbp_wins"]:
        msg = (f"the FBP/FDK explains the held-out projections better than the DIP (mean squared residual "
               f"{fbp_mse:.3g} vs {dip_mse:.3g}): the DIP reconstruction is not to be trusted over the FBP here; "
               "try a longer fit (dip.iterations, dip.patience), another dip.lr or dip.gamma")
        out["message"] = msg
        if cfg.fallback == "error":
            raise DipuqError(msg + " (dip.fallback = 'error')")
        ctx.log(f"dipuq: warning: {msg}")
    return out


def dip_unfinished(dip) -> bool:
    """Whether a validation-stopped fit hit its iteration cap or time limit before the held-out loss
    stopped improving (its kept iterate lies within the patience window of the end)."""
    if dip.stop_reason not in ("iterations", "time") or not dip.history.get("val"):
        return False

    cfg = DipConfig.from_dict(dip.config)
    return dip.iterations - 1 - dip.best_iteration < validation_window(cfg, dip.best_iteration)


def stage_linearise(ctx: RunContext, cfg) -> dict:
    """Linearise the network at θ* and estimate the g-prior scales s."""
    model = ctx["model"]
    scale = gprior_scale(model, ctx["A"], n_probes=cfg.diag_probes or None, generator=ctx.gen("linearise"))
    save_torch({"scale": scale.cpu(), "p": model.p}, ctx.path("linearise", "scale.pt"))
    ctx["scale"] = scale
    return {"p": model.p, "d": model.d}


def stage_refit(ctx: RunContext, cfg) -> dict:
    """Continue the DIP from θ* for ``refit.steps`` Adam steps on all angles, held-out ones included.

    Runs after the calibration: the held-out angles have chosen the TV weight, stopped the fit,
    checked it against the FBP and calibrated the error bars, and are now used as data. The
    linearised posterior and its calibrated std maps stay those of the held-out fit θ* (the refit
    sees ~10 % more angles, so they are, if anything, conservative for it). Measured on tooth2d and
    shepp2d (18 runs): README, "Refit on all angles". The refit is in the fit's normalised units,
    so a scaled scan gives the same steps (unit invariance).
    """
    dip, split = ctx["dip"], ctx["split"]
    if not cfg.steps or not split.has_heldout:
        why = "refit.steps = 0" if not cfg.steps else "no held-out angles: the DIP fit saw every angle"
        out = {"refit": False, "reason": why}
        if ctx.is_main:
            atomic_write_json(ctx.path("refit", "refit.json"), out)
        ctx["refit"] = None
        return out
    A_all = ctx["A_all"]
    y_all = torch.as_tensor(ctx["scan"].projections / ctx["norm"], dtype=A_all.dtype, device=A_all.device)
    net = dip.build_net(device=ctx.device)
    dcfg = dataclasses.replace(DipConfig.from_dict(dip.config), iterations=cfg.steps, lr_ramp=cfg.ramp, stop="none",
                               max_seconds=0.0)
    callbacks = [ThreadGovernor(log=ctx.log)] if ctx.device.type == "cpu" else []
    result = run_dip(net, A_all, y_all, dcfg, x_input=dip.net_input.to(device=ctx.device, dtype=A_all.dtype),
                     generator=ctx.gen("refit"), checkpoint=ctx.path("refit", "refit.ckpt"), callbacks=callbacks,
                     progress=ctx.progress, warm=True)
    result.save(ctx.path("refit", "refit.pt"))
    with torch.no_grad():
        before = float((A_all(dip.recon.to(A_all.dtype)) - y_all).double().square().mean())
    out = {"refit": True, "steps": result.iterations, "kept_iteration": result.best_iteration,
           "misfit_all_before": before, "misfit_all_after": float(result.history["misfit"][result.best_iteration]),
           "seconds": float(result.timings["total_s"])}
    if ctx.is_main:
        atomic_write_json(ctx.path("refit", "refit.json"), out)
    ctx["refit"] = result
    return out


def _load_refit(ctx):
    path = ctx.path("refit", "refit.pt")
    return DipResult.load(path) if path.exists() else None


def _load_dip(ctx):
    return DipResult.load(ctx.path("dip", "dip.pt"))


def _load_net(ctx):
    return ctx["dip"].build_net(device=ctx.device)


def _load_model(ctx):
    cfg = ctx.config.linearise
    dip = ctx["dip"]
    return LinearisedModel(ctx["net"], dip.net_input.to(ctx.device), ctx["A"], params=cfg.params,
                           batching=cfg.batching, chunk_size=cfg.chunk_size or None)


def _load_scale(ctx):
    return load_torch(ctx.path("linearise", "scale.pt"))["scale"].to(ctx.device)


DIP = Stage("dip", "dip: fitting the deep image prior", stage_dip, "dip",
            outputs={"dip": _load_dip, "net": _load_net}, cleanup=("fit.ckpt",))
REFIT = Stage("refit", "refit: the DIP continued on every angle, held-out ones included", stage_refit, "refit",
              outputs={"refit": _load_refit}, cleanup=("refit.ckpt",))
LINEARISE = Stage("linearise", "linearise: Jacobian at the fit and g-prior scales", stage_linearise, "linearise",
                  outputs={"model": _load_model, "scale": _load_scale})
