"""A self-contained HTML report of one run: slice viewer, metrics, figures, config, provenance.

The report is ONE file with no external resources: every image is an embedded base64 PNG and
the few lines of JavaScript that drive the sliders are inline, so it can be mailed, archived or
opened offline. For each axis (axial / coronal / sagittal; a single view in 2D) a slider moves
through at most ``n_slices`` evenly spaced slices, pre-rendered for each quantity
(reconstruction, reference, posterior std, |error|, z-score) with the colour scales of
:func:`dipuq.show.prepare.display_scales` (fixed over all slices, so slices compare directly).

Rendering goes through :mod:`dipuq.show.viz` (the only matplotlib user); this module writes HTML.

Example::

    >>> write_report("run/report.html", recon, std, reference=ref, metrics={"psnr": 31.2},
    ...              figures={"Calibration": png_bytes}, config_text=toml, provenance=prov)
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dipuq._io import atomic_write_text, to_jsonable
from dipuq.show import prepare, viz

__all__ = ["write_report", "render_report", "METRIC_DESCRIPTIONS"]

#: Metric key -> (label, what it means, which direction is better)
METRIC_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "psnr": ("PSNR [dB]", "peak signal-to-noise ratio of x̂ against the reference (higher is better)"),
    "ssim": ("SSIM", "structural similarity of x̂ and the reference, 1 = identical"),
    "log_likelihood": ("test log-likelihood", "mean over voxels of log N(x_ref; x̂, σ²) (higher is better)"),
    "coverage_50": ("coverage 50 %", "fraction of voxels whose reference lies in x̂ ± 0.67σ (ideal 0.50)"),
    "coverage_90": ("coverage 90 %", "fraction of voxels whose reference lies in x̂ ± 1.64σ (ideal 0.90)"),
    "coverage_95": ("coverage 95 %", "fraction of voxels whose reference lies in x̂ ± 1.96σ (ideal 0.95)"),
    "calibration_error": ("calibration error", "mean |empirical − nominal| coverage over levels (0 = calibrated)"),
    "spearman_std_abs_error": ("Spearman ρ(σ, |error|)", "rank correlation of σ with |error|: do error bars point at errors?"),
    "crps": ("CRPS", "continuous ranked probability score, mean over voxels (lower is better)"),
    "rmse": ("RMSE", "root mean squared error of x̂ (lower is better)"),
    "fbp_psnr": ("PSNR of FBP/FDK [dB]", "the analytic reconstruction's PSNR, for comparison"),
    "fbp_ssim": ("SSIM of FBP/FDK", "the analytic reconstruction's SSIM, for comparison"),
    "n_samples": ("posterior samples", "number of samples behind the std map"),
    "std_mc_rel_error": ("MC error of σ", "mean Monte-Carlo standard error of σ relative to σ (sampling noise of the std map)"),
    "mean_std": ("mean σ", "average posterior standard deviation"),
    "mean_abs_error": ("mean |error|", "average absolute error of x̂"),
    "zscore_std": ("std of z-scores", "spread of (x̂ − x_ref)/σ; 1 when σ is calibrated"),
    "patch_loglik": ("patch log-likelihood", "Gaussian log-likelihood of p×p patches with sample covariances"),
    "covered_fraction": ("covered region", "share of voxels seen by every projection angle; the reference metrics are computed there"),
    "heldout_mse_dip": ("held-out residual, DIP", "mean squared residual of the DIP on the held-out angles (fit units; lower is better)"),
    "heldout_mse_fbp": ("held-out residual, FBP/FDK", "the same for the FBP/FDK of the fitted angles: if it is lower, the FBP explains unseen data better"),
    "missing_wedge_deg": ("missing wedge (°)", "ray directions no view measures: the error bars do not include that wedge's error"),
    "fbp_wins": ("FBP beats the DIP on held-out data", "True is a warning: the DIP is not to be trusted over the FBP/FDK here"),
    "calibration_model": ("calibration model", "variance model fitted on the held-out projections ('raw': none could be trusted)"),
    "calibration_fallback": ("calibration fallback", "why the uncalibrated posterior std was kept (the held-out angles disagreed about the scale)"),
    "calibration_scale": ("calibration scale c", "factor on the linearised posterior covariance (1 = the raw posterior was right)"),
    "calibration_df": ("interval degrees of freedom", "Student-t degrees of freedom of the error bars (None = Gaussian)"),
    "calibration_boot_weight": ("bootstrap weight w", "weight of the equivariant bootstrap's simulated reconstruction error in the error bars (0 = not used)"),
    "heldout_log_likelihood_raw": ("held-out log-likelihood, raw", "mean log predictive density of the held-out rays under the raw posterior"),
    "heldout_log_likelihood_cv": ("held-out log-likelihood, calibrated", "the same under the calibrated model, each held-out angle predicted by parameters fitted on the others"),
    "heldout_coverage_90_raw": ("held-out coverage 90 %, raw", "fraction of held-out rays inside their raw 90 % predictive interval (ideal 0.90)"),
    "heldout_coverage_90": ("held-out coverage 90 %, calibrated", "the same after calibration, out of fold (ideal 0.90; needs no reference)"),
    "dip_iterations": ("DIP iterations", "Adam steps taken"),
    "dip_best_iteration": ("DIP kept iterate", "the iterate kept (lowest held-out loss under the validation stop)"),
    "dip_stop_reason": ("DIP stop reason", "validation: held-out loss stopped improving; iterations: the cap was hit (maybe unfinished)"),
    "refit_steps": ("refit steps", "steps of the final refit on every angle, held-out ones included, from the kept iterate (0 = no refit); the reconstruction shown is the refit's"),
    "psnr_before_refit": ("PSNR before the refit", "PSNR of the held-out-stopped fit, before the refit on every angle [dB]"),
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1280px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:1.5em;margin:0.2em 0}
h2{font-size:1.15em;margin:1.6em 0 0.5em;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 1em}
.note{color:#555;font-size:0.9em;max-width:70em}
.warn{background:#fff3f0;border:1px solid #e0a090;border-radius:6px;padding:8px 12px;max-width:70em}
.viewer{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:10px 12px;margin:10px 0}
.viewer .ctrl{display:flex;align-items:center;gap:12px;margin-bottom:8px}
.viewer .ctrl b{min-width:7em}
.viewer input[type=range]{flex:1;max-width:520px}
.panels{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;text-align:center}
figcaption{font-size:0.85em;color:#333;margin-bottom:3px}
img.slice{width:220px;image-rendering:pixelated;display:block;border:1px solid #ccc}
img.cbar{width:220px;display:block}
table{border-collapse:collapse;background:#fff;font-size:0.92em}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:12px}
.figs figure{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:6px}
.figs img{max-width:600px;display:block}
pre{background:#fff;border:1px solid #e2e2e2;padding:10px;overflow:auto;font-size:0.82em;max-height:420px}
details summary{cursor:pointer;font-weight:600;margin:0.8em 0 0.3em}
"""

_JS = """
const FRAMES = JSON.parse(document.getElementById('frames').textContent);
function show(axis, pos) {
  const f = FRAMES[axis];
  pos = Math.max(0, Math.min(f.indices.length - 1, pos|0));
  for (const q of f.quantities) {
    document.getElementById('img-' + axis + '-' + q).src = 'data:image/png;base64,' + f.images[q][pos];
  }
  const lab = document.getElementById('label-' + axis);
  lab.textContent = f.name + ' = ' + f.indices[pos] + ' / ' + (f.size - 1);
  lab.dataset.index = f.indices[pos];
}
for (const axis of Object.keys(FRAMES)) {
  const s = document.getElementById('slider-' + axis);
  s.addEventListener('input', () => show(axis, parseInt(s.value)));
  show(axis, parseInt(s.value));
}
"""


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return html.escape(str(v))


def _flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            rows += _flat_metrics(v, f"{prefix}{k}.")
        elif isinstance(v, (list, tuple)) and len(v) > 6:
            continue  # curves belong in figures, not the table
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _downsample(img: np.ndarray, max_px: int) -> np.ndarray:
    step = int(np.ceil(max(img.shape) / max_px))
    return img[::step, ::step] if step > 1 else img


def _frames(maps: dict[str, np.ndarray], n_slices: int, zscore_limit: float, max_px: int) -> tuple[dict, dict]:
    """Pre-rendered base64 PNG slices per axis and quantity, plus one colour bar per quantity."""
    scales = prepare.display_scales(maps, zscore_limit)
    names = [q for q in prepare.QUANTITIES if q in maps]
    shape = maps[names[0]].shape
    cbars = {}
    for q in names:
        lo, hi = scales[q]
        cbars[q] = _b64(viz.colorbar_png(prepare.QUANTITIES[q][1], lo, hi, width=2.4))
    frames = {}
    axes = ("z", "y", "x") if len(shape) == 3 else ("z",)
    for a in axes:
        n = shape["zyx".index(a)] if len(shape) == 3 else 1
        idx = prepare.slice_indices(n, n_slices)
        images = {q: [] for q in names}
        for k in idx:
            for q in names:
                lo, hi = scales[q]
                img = _downsample(prepare.take_slice(maps[q], a, k), max_px)
                images[q].append(_b64(viz.array_png(img, prepare.QUANTITIES[q][1], lo, hi)))
        name = f"{prepare.AXES[a]} slice {a}" if len(shape) == 3 else "slice"
        frames[a] = {"indices": idx, "size": n, "name": name, "quantities": names, "images": images,
                     "start": idx.index(n // 2) if n // 2 in idx else len(idx) // 2}
    return frames, cbars


def render_report(
    recon: np.ndarray,
    std: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    metrics: Mapping[str, Any] | None = None,
    figures: Mapping[str, bytes] | None = None,
    config_text: str = "",
    provenance: Mapping[str, Any] | None = None,
    title: str = "dipuq reconstruction",
    subtitle: str = "",
    n_slices: int = 24,
    zscore_limit: float = 3.0,
    max_px: int = 256,
    warnings: Sequence[str] = (),
) -> str:
    """The report as an HTML string (see the module docstring).

    Parameters
    ----------
    recon, std : reconstruction and posterior std, same shape ``(y, x)`` or ``(z, y, x)``
    reference : optional reference volume (then |error| and z-score are shown too)
    metrics : flat or nested ``{name: value}``; known names get a label and explanation
    figures : ``{caption: png_bytes}`` diagnostics (calibration, loss curves, ...)
    config_text, provenance : shown verbatim / as JSON in collapsible sections
    n_slices : slices pre-rendered per axis (bounds the file size)
    max_px : slices larger than this are subsampled for the viewer
    warnings : lines shown in a box at the top (e.g. "the FBP explains the held-out data better")
    """
    maps = prepare.derived_maps(recon, std, reference)
    frames, cbars = _frames(maps, n_slices, zscore_limit, max_px)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">{html.escape(subtitle)}</p>' if subtitle else "",
    ]
    for w in warnings:
        parts.append(f'<p class="warn"><b>Warning:</b> {html.escape(w)}</p>')

    parts += _viewer_html(frames, cbars, reference is not None)
    parts += _metrics_html(metrics, reference is not None)
    # -- figures
    if figures:
        parts.append('<h2>Diagnostics</h2><div class="figs">')
        for caption, png in figures.items():
            parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{_b64(png)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")

    # -- config & provenance
    if config_text:
        parts.append(f"<details><summary>Configuration</summary><pre>{html.escape(config_text)}</pre></details>")
    if provenance:
        prov = json.dumps(to_jsonable(dict(provenance)), indent=2)
        parts.append(f"<details><summary>Provenance</summary><pre>{html.escape(prov)}</pre></details>")

    data = json.dumps({a: {k: v for k, v in f.items() if k != "start"} for a, f in frames.items()})
    parts.append(f'<script type="application/json" id="frames">{data}</script>')
    parts.append(f"<script>{_JS}</script></main></body></html>")
    return "\n".join(p for p in parts if p)


def _viewer_html(frames: dict, cbars: dict, has_reference: bool) -> list[str]:
    """The slice viewer: one slider per axis over pre-rendered slices of every quantity."""
    parts = ["<h2>Slices</h2>"]
    explain = ("x̂ is the reconstruction (the fitted deep image prior), σ the per-voxel posterior standard deviation "
               "(the error bar). ")
    if has_reference:
        explain += ("|error| is the actual error against the reference (σ and |error| each have their own colour "
                    "scale: compare the numbers on the bars). The z-score (x̂ − x_ref)/σ compares the two voxel by "
                    "voxel: it looks like pale noise where the error bars are right; saturated red/blue marks errors "
                    "the error bars do not cover.")
    parts.append(f'<p class="note">{html.escape(explain)} Colour scales are fixed across slices.</p>')
    for a, f in frames.items():
        view = prepare.AXES[a].capitalize() if len(frames) > 1 else "Image"
        parts.append(f'<div class="viewer" id="viewer-{a}"><div class="ctrl"><b>{view}</b>')
        parts.append(f'<input type="range" id="slider-{a}" min="0" max="{len(f["indices"]) - 1}" step="1" '
                     f'value="{f["start"]}" aria-label="{view} slice">')
        parts.append(f'<span id="label-{a}" class="label"></span></div><div class="panels">')
        for q in f["quantities"]:
            parts.append(f'<figure><figcaption>{html.escape(prepare.QUANTITIES[q][0])}</figcaption>'
                         f'<img class="slice" id="img-{a}-{q}" alt="{html.escape(prepare.QUANTITIES[q][0])}" '
                         f'src="data:image/png;base64,{f["images"][q][f["start"]]}">'
                         f'<img class="cbar" alt="colour scale" src="data:image/png;base64,{cbars[q]}"></figure>')
        parts.append("</div></div>")
    return parts


def _metrics_html(metrics: Mapping[str, Any] | None, has_reference: bool) -> list[str]:
    """The metrics table (known names with their meaning), or why there is none."""
    parts = []
    if metrics:
        parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>value</th><th>meaning</th></tr>")
        for k, v in _flat_metrics(metrics):
            label, meaning = METRIC_DESCRIPTIONS.get(k.split(".")[-1], (k, ""))
            parts.append(f'<tr><td>{html.escape(label)}</td><td class="num">{_fmt(v)}</td><td>{html.escape(meaning)}</td></tr>')
        parts.append("</table>")
    elif not has_reference:
        parts.append('<h2>Metrics</h2><p class="note">No reference volume: error, z-score, calibration and '
                     "metrics need one (simulated scans and the demo have it).</p>")
    return parts


def write_report(path: str | Path, recon, std, **kw) -> Path:
    """Render :func:`render_report` and write it atomically to ``path``."""
    return atomic_write_text(path, render_report(recon, std, **kw))
