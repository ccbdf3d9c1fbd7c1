"""Stages ``calibrate``, ``maps`` and ``metrics``: the variance model fitted on the held-out
projections, the reconstruction and std volumes in the scan's units, and the metrics (against
the reference where there is one; the held-out checks always)."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from dipuq._io import atomic_save_npy, atomic_save_tiff, atomic_write_json
from dipuq.dip.tv import choose_tv_weight
from dipuq.maps.bootstrap import bootstrap_errors, image_df
from dipuq.maps.calibration import HeldoutPredictive, VarianceModel, calibrate
from dipuq.maps.metrics import psnr, ssim, uncertainty_metrics
from dipuq.maps.uncertainty import UncertaintyMaps
from dipuq.run.context import RunContext, Stage
from dipuq.run.stages.data import FULL_COVERAGE

__all__ = ["CALIBRATE", "MAPS", "METRICS", "calibrated_model"]

#: The bootstrap's image-space error variance, in the calibrate stage's folder (read by maps).
BOOTSTRAP_FILE = "bootstrap_var.npy"


def stage_calibrate(ctx: RunContext, cfg) -> dict:
    """Fit the variance model of the error bars on the held-out projections (:mod:`dipuq.maps.calibration`),
    with the equivariant bootstrap's model-error term (:mod:`dipuq.maps.bootstrap`) among its candidates."""
    A_H, y_H = ctx["A_H"], ctx["y_H"]
    if not cfg.enabled or A_H is None:
        why = "calibration.enabled = false" if not cfg.enabled else "no held-out angles (data.holdout = 0)"
        out = {"enabled": False, "reason": why}
    else:
        extra, post, dip = ctx["extra_moments"], ctx["posterior"], ctx["dip"]
        with torch.no_grad():
            resid = (y_H - A_H(dip.recon.to(A_H.dtype))).double().cpu().numpy()
        groups = np.broadcast_to(np.arange(A_H.range_shape[0]).reshape(-1, *([1] * (len(A_H.range_shape) - 1))),
                                 A_H.range_shape)
        boot = _bootstrap(ctx, cfg) if cfg.bootstrap else None
        pred = HeldoutPredictive(resid, extra["heldout_post"].variance().cpu().numpy(),
                                 extra["heldout_prior"].variance().cpu().numpy(), post.sigma2, groups,
                                 None if boot is None else boot.heldout_variance.cpu().numpy())
        t0 = time.perf_counter()
        model, report = calibrate(pred, cfg.terms, cfg.noise, cfg.tails)
        if model.boot_weight > 0:  # the image-space interval shape, from the bootstrap's own replicates
            post_img = ctx["moments"].variance().reshape(boot.errors.shape[1:]).double()
            prior_img = extra["prior"].variance().reshape(boot.errors.shape[1:]).double()
            floor = model.image_variance(post_img, prior_img)
            mask = torch.as_tensor(ctx["coverage"] >= FULL_COVERAGE).reshape(boot.errors.shape[1:])
            model.image_df = image_df(boot.errors, model.boot_weight, floor, generator=ctx.gen("calibrate"), mask=mask)
            report["parameters"] = model.to_dict()
        out = {"enabled": True, **report, "fit_seconds": time.perf_counter() - t0,
               "sigma2_source": "held-out fit" if cfg.noise == "fit" and report["model"] != "raw"
               else ctx["em"].get("sigma2_source")}
        if boot is not None:
            out["bootstrap"] = boot.summary()
            if ctx.is_main:
                atomic_save_npy(ctx.path("calibrate", BOOTSTRAP_FILE), boot.variance.cpu().numpy().astype(np.float32))
            ctx["bootstrap_var"] = boot.variance
        if report["fallback"]:
            ctx.log(f"dipuq: warning: calibration: {report['fallback']}")
    wedge = ctx["scan"].geometry.missing_wedge_deg()
    if wedge > 0:
        out["missing_wedge_deg"] = wedge
        ctx.log(f"dipuq: warning: {missing_wedge_message(wedge)}")
    if ctx.is_main:
        atomic_write_json(ctx.path("calibrate", "calibration.json"), out)
    ctx["calibration"] = out
    keep = ("enabled", "reason", "model", "heldout_log_likelihood_raw", "heldout_log_likelihood_cv")
    summary = {k: out[k] for k in keep if k in out}
    if out.get("enabled"):
        summary |= {"scale": out["parameters"]["scale"], "boot_weight": out["parameters"].get("boot_weight", 0.0)}
    return summary


def _bootstrap(ctx: RunContext, cfg):
    """The equivariant bootstrap of the DIP fit θ* (fit units) with the TV weight its input was made with."""
    dip, A = ctx["dip"], ctx["A"]
    if dip.tv:
        lam = float(dip.tv["lam"])
    else:  # a DIP without TV input or term: the held-out angles choose the weight here
        lam = choose_tv_weight(A, ctx["y"], (ctx["A_H"], ctx["y_H"]), n_iter=cfg.bootstrap_iter,
                               generator=ctx.gen("calibrate")).lam
    bar = ctx.tqdm(total=cfg.bootstrap, desc="bootstrap", unit="replicate")
    try:
        boot = bootstrap_errors(A, ctx["A_H"], dip.recon.reshape(A.domain_shape), ctx["posterior"].sigma2, lam,
                                cfg.bootstrap, generator=ctx.gen("calibrate"), tv_iter=cfg.bootstrap_iter,
                                callback=lambda k: bar.update(1))
    finally:
        bar.close()
    ctx.log(f"dipuq: equivariant bootstrap: {cfg.bootstrap} TV reconstructions of the rotated DIP image "
            f"(weight {lam:g}) in {boot.seconds:.1f} s")
    return boot


def missing_wedge_message(wedge_deg: float) -> str:
    """Why the error bars of a limited-angle scan are too narrow (the held-out angles cannot tell)."""
    return (f"no view measures a {wedge_deg:.0f}° wedge of ray directions (limited-angle scan): the held-out "
            "angles lie inside the measured range, so the calibrated error bars do not include the missing "
            "wedge's error and are too narrow there (Shepp-Logan over a 100° arc: 90 % intervals covered 0.73-0.75 of "
            "the voxels)")


def calibrated_model(calibration: dict):
    """The fitted :class:`~dipuq.maps.calibration.VarianceModel` of a calibrate stage's record (None: off)."""
    return VarianceModel(**calibration["parameters"]) if calibration.get("enabled") else None


def stage_maps(ctx: RunContext, cfg) -> dict:
    """Predictive mean (the DIP reconstruction, refitted on all angles unless ``refit.steps = 0``) and std maps (calibrated when the calibrate stage ran,
    the raw linearised-posterior std beside it), in the scan's units; the top-level NPY/TIFF files."""
    dip, moments, norm, refit = ctx["dip"], ctx["moments"], ctx["norm"], ctx["refit"]
    model = calibrated_model(ctx["calibration"])
    raw_var = moments.variance()
    std_raw = raw_var.clamp_min(0).sqrt() * norm
    mean = (refit if refit is not None else dip).recon
    meta = {"mean": "dip reconstruction f(theta*)" if refit is None else
            f"dip reconstruction refitted on all angles ({refit.iterations} steps from theta*)",
            "norm": norm, "df": None, "calibrated": model is not None}
    if model is not None:
        prior = ctx["extra_moments"]["prior"].variance()
        boot = ctx["bootstrap_var"].reshape(raw_var.shape).to(raw_var) if model.boot_weight else None
        std = model.image_variance(raw_var, prior, boot).clamp_min(0).sqrt() * norm
        meta.update(df=model.voxel_df, calibration=model.to_dict())
    else:
        std = std_raw
    se = moments.std_se() * norm * (std / std_raw.clamp_min(1e-30))  # MC error of the raw std, carried by the model
    maps = UncertaintyMaps(mean=(mean * norm).detach().cpu().numpy().reshape(moments.shape),
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
    if cal.get("missing_wedge_deg"):
        m["missing_wedge_deg"] = cal["missing_wedge_deg"]
    if cal.get("enabled"):
        if cal.get("fallback"):
            m["calibration_fallback"] = cal["fallback"]
        m.update({"calibration_model": cal["model"], "calibration_scale": cal["parameters"]["scale"],
                  "calibration_df": VarianceModel(**cal["parameters"]).voxel_df,
                  "calibration_boot_weight": cal["parameters"].get("boot_weight", 0.0),
                  "heldout_log_likelihood_raw": cal["heldout_log_likelihood_raw"],
                  "heldout_log_likelihood_cv": cal["heldout_log_likelihood_cv"]})
        lv = cal["levels"]
        i90 = min(range(len(lv)), key=lambda i: abs(lv[i] - 0.9))
        m["heldout_coverage_90_raw"] = cal["coverage_raw"][i90]
        m["heldout_coverage_90"] = cal["coverage_calibrated"][i90]
    dip, refit = ctx["dip"], ctx["refit"]
    m.update(dip_iterations=dip.iterations, dip_best_iteration=dip.best_iteration, dip_stop_reason=dip.stop_reason,
             refit_steps=refit.iterations if refit is not None else 0)
    if refit is not None and scan.reference is not None:  # what the refit changed, measured
        m["psnr_before_refit"] = psnr(dip.recon.cpu().numpy().reshape(mask.shape)[mask] * ctx["norm"], ref[mask],
                                      data_range=float(ref[mask].max() - ref[mask].min()))
    atomic_write_json(ctx.run.path("metrics.json"), m)
    ctx["metrics"] = m
    return {k: m[k] for k in ("psnr", "coverage_90", "calibration_error", "heldout_coverage_90", "fbp_wins") if k in m}


def _load_calibration(ctx):
    return json.loads(ctx.path("calibrate", "calibration.json").read_text())


def _load_bootstrap_var(ctx):
    p = ctx.path("calibrate", BOOTSTRAP_FILE)
    return torch.as_tensor(np.load(p), device=ctx.device) if p.exists() else None


def _load_maps(ctx):
    return UncertaintyMaps.load(ctx.path("maps", "maps.npz"))


def _load_metrics(ctx):
    p = ctx.run.path("metrics.json")
    return json.loads(p.read_text()) if p.exists() else None


CALIBRATE = Stage("calibrate", "calibrate: fitting the error bars to the held-out projections", stage_calibrate,
                  "calibration", outputs={"calibration": _load_calibration, "bootstrap_var": _load_bootstrap_var})
MAPS = Stage("maps", "maps: reconstruction and std volumes (NPY, TIFF)", stage_maps, "output",
             outputs={"maps": _load_maps})
METRICS = Stage("metrics", "metrics: comparison with the reference", stage_metrics, "output",
                outputs={"metrics": _load_metrics})
