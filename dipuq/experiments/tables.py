"""Metrics of each run and the tables over seeds: ``results.csv``, ``table.md``, ``table.csv``.

:data:`METRICS` names the columns (result.json and CSV key -> header, format, which way is
better); :func:`method_metrics` computes them for one reconstruction; :func:`aggregate` takes
mean and std over seeds per (case, method).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from dipuq._io import atomic_write_text
from dipuq.experiments.methods import METHODS
from dipuq.experiments.spec import ExperimentSpec
from dipuq.maps.metrics import psnr, ssim, uncertainty_metrics

__all__ = ["METRICS", "method_metrics", "aggregate", "table_markdown", "write_rows_csv", "write_table_csv"]

#: Metric keys (result.json / CSV) -> (table header, format, better: "max" | "min" | "one" | None).
METRICS = {
    "psnr": ("PSNR", "{:.2f}", "max"),
    "ssim": ("SSIM", "{:.3f}", "max"),
    "log_likelihood": ("log-lik", "{:.2f}", "max"),
    "coverage_90": ("cov@90", "{:.3f}", None),
    "calibration_error": ("cal.err", "{:.3f}", "min"),
    "spearman_std_abs_error": ("Spearman", "{:.3f}", "max"),
    "crps": ("CRPS", "{:.4f}", "min"),
    "time_fit_s": ("fit s", "{:.0f}", None),
    "time_uq_s": ("UQ s", "{:.0f}", None),
    "time_total_s": ("total s", "{:.0f}", None),
}


def method_metrics(reference: np.ndarray, recon: np.ndarray, std: np.ndarray | None,
                   df: float | None = None, mask: np.ndarray | None = None) -> dict[str, float]:
    """PSNR and SSIM of ``recon``; with a ``std`` also the uncertainty metrics (NaN without);
    ``df``: the Student-t interval shape of calibrated maps; ``mask``: the voxels every metric but
    SSIM is computed on (the region every projection angle sees, as in a run's ``metrics.json``)."""
    if std is not None:
        m = uncertainty_metrics(reference, recon, std, df=df, mask=mask)
    else:
        keep = np.ones(reference.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(reference.shape)
        m = {"psnr": psnr(np.asarray(recon).reshape(reference.shape)[keep], reference[keep])}
        if reference.ndim in (2, 3) and min(reference.shape) >= 11:
            m["ssim"] = ssim(recon, reference)
    return {k: float(m.get(k, math.nan)) for k in ("psnr", "ssim", "log_likelihood", "coverage_50", "coverage_90",
                                                    "coverage_95", "calibration_error", "spearman_std_abs_error", "crps")}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std (ddof = 1; 0 for one seed) over seeds, per (case, method), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["method"]), []).append(r)
    out = []
    for (case, method), rs in groups.items():
        agg = {"case": case, "method": method, "n_seeds": len(rs)}
        for k in METRICS:
            vals = np.array([r.get(k, math.nan) for r in rs], dtype=np.float64)
            if np.isnan(vals).all():
                agg[k], agg[f"{k}_std"] = math.nan, math.nan
            else:
                agg[k] = float(np.nanmean(vals))
                agg[f"{k}_std"] = float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def _fmt(v: float, s: float, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    spread = f.format(s) if s and not math.isnan(s) else ""
    return f.format(v) + (f" ± {spread}" if spread and float(spread) != 0 else "")


def table_markdown(spec: ExperimentSpec, table: list[dict], seeds: int) -> str:
    """``table.md``: per case, one row per method (mean ± std over seeds), the best value per column in bold."""
    lines = [f"## {spec.name}: {spec.experiment.title}", "",
             f"Mean ± std over {seeds} seed(s). Best value per column in **bold** (coverage: closest to 0.9). "
             "— = not applicable (point estimate). Times in seconds (fit = FBP + DIP fit; UQ = linearise + EM + sampling, "
             "or MC-dropout passes).", ""]
    for case in dict.fromkeys(r["case"] for r in table):
        rs = [r for r in table if r["case"] == case]
        lines += [f"### {case}", "", "| method | " + " | ".join(h for h, _, _ in METRICS.values()) + " |",
                  "|---|" + "---|" * len(METRICS)]
        best = {}
        for k, (_, _, how) in METRICS.items():
            vals = [(r[k], i) for i, r in enumerate(rs) if not math.isnan(r[k])]
            if k == "coverage_90":
                vals = [(-abs(v - 0.9), i) for v, i in vals]
                how = "max"
            if vals and how in ("max", "min"):
                target = max(v for v, _ in vals) if how == "max" else min(v for v, _ in vals)
                best[k] = {i for v, i in vals if v == target}
        for i, r in enumerate(rs):
            cells = []
            for k, (_, f, _) in METRICS.items():
                c = _fmt(r[k], r[f"{k}_std"], f)
                cells.append(f"**{c}**" if i in best.get(k, ()) and len(rs) > 1 else c)
            label = METHODS[r["method"]].label + (f" (n={r['n_seeds']})" if r["n_seeds"] != seeds else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def write_rows_csv(path: Path, rows: list[dict]) -> None:
    """``results.csv``: one row per (seed, case, method), every key any row has."""
    keys = ["seed", "case", "method"]
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def write_table_csv(path: Path, table: list[dict]) -> None:
    """``table.csv``: the :func:`aggregate` rows, each metric with its ``_std``."""
    keys = ["case", "method", "n_seeds"] + [x for k in METRICS for x in (k, f"{k}_std")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in table:
        w.writerow({k: _cell(r[k]) for k in keys})
    atomic_write_text(path, buf.getvalue())
