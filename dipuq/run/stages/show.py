"""Stages ``figures`` and ``report``: the PNG diagnostics and the self-contained ``report.html``
(its warnings box first: the FBP beating the DIP, an unfinished fit, unconverged samples)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dipuq._io import atomic_write_json
from dipuq.run.config import dumps_config
from dipuq.run.context import RunContext, Stage
from dipuq.run.stages.data import FULL_COVERAGE
from dipuq.run.stages.fit import dip_unfinished
from dipuq.run.stages.maps import missing_wedge_message
from dipuq.samplers.base import SAMPLER_RESIDUAL_WARN
from dipuq.show import prepare, viz
from dipuq.show.report import write_report

__all__ = ["FIGURES", "REPORT"]


def _figure_set(ctx: RunContext, cfg) -> dict[str, Any]:
    """name -> (caption, matplotlib figure) for every diagnostic that applies to this run."""
    scan, maps, dip = ctx["scan"], ctx["maps"], ctx["dip"]
    ref = scan.reference
    out = {}
    quantities = prepare.derived_maps(maps.mean, maps.std, ref)
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
        nominal, empirical = prepare.coverage_curve(err[mask], maps.std[mask], df=maps.meta.get("df"))
        curves, labels = [empirical], ["dipuq (calibrated)" if maps.meta.get("calibrated") else "dipuq"]
        if maps.meta.get("calibrated"):
            curves.append(prepare.coverage_curve(err[mask], np.load(ctx.run.path("std_raw.npy"))[mask])[1])
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
    if not cfg.figures:
        return {"skipped": "output.figures = false"}
    written = {}
    for name, (caption, fig) in _figure_set(ctx, cfg).items():
        viz.save_figure(fig, ctx.run.path("figures", f"{name}.png"), dpi=cfg.dpi)
        written[name] = caption
    atomic_write_json(ctx.path("figures", "captions.json"), written)
    return {"files": [f"figures/{n}.png" for n in written]}


def _run_warnings(ctx: RunContext) -> list[str]:
    """What the report must put first: the FBP beating the DIP, an unfinished fit, a missing wedge,
    unconverged samples."""
    out = []
    path = ctx.path("dip", "heldout.json")
    check = json.loads(path.read_text()) if path.exists() else {}
    if check.get("fbp_wins"):
        out.append(check.get("message", "the FBP/FDK explains the held-out projections better than the DIP"))
    dip = ctx["dip"]
    if dip_unfinished(dip):
        out.append(f"the DIP fit was stopped by its {'iteration cap' if dip.stop_reason == 'iterations' else 'time limit'} "
                   f"at iteration {dip.iterations} while the held-out loss was still falling (kept iterate "
                   f"{dip.best_iteration}): it may be unfinished; raise dip.iterations / dip.max_seconds")
    wedge = ctx["calibration"].get("missing_wedge_deg")
    if wedge:
        out.append(missing_wedge_message(wedge))
    residual = ctx["sampling"].get("final_relative_residual")
    if residual is not None and residual > SAMPLER_RESIDUAL_WARN:
        out.append(f"the sampler stopped at a convergence measure of {residual:.2g} (> {SAMPLER_RESIDUAL_WARN:g}): "
                   "the std map is biased")
    return out


def stage_report(ctx: RunContext, cfg) -> dict:
    """The self-contained ``report.html``."""
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


FIGURES = Stage("figures", "figures: PNG slices and diagnostics", stage_figures, "output")
REPORT = Stage("report", "report: report.html", stage_report, "output")
