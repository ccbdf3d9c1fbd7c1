"""Comparison figures of one seed: every method side by side on one slice, and their
reliability diagrams overlaid (``OUT/figures/{case}_slices.png``, ``{case}_calibration.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dipuq.data.scan import Scan
from dipuq.experiments.methods import METHODS, RESULT
from dipuq.experiments.spec import ExperimentSpec
from dipuq.show import prepare, viz

__all__ = ["comparison_figures"]


def comparison_figures(spec: ExperimentSpec, out: Path, seed: int = 0) -> list[Path]:
    """Write ``out/figures/{case}_slices.png`` and ``{case}_calibration.png`` for ``seed``; return their paths."""
    written = []
    for case in spec.cases:
        folder = out / f"seed{seed}" / case.name
        if not (folder / "scan.npz").exists():
            continue
        ref = Scan.load(folder / "scan.npz").reference
        recons, stds = {}, {}
        for method in spec.methods.run:
            if not (folder / method / RESULT).exists():
                continue
            label = METHODS[method].label
            recons[label] = np.load(folder / method / "recon.npy")
            sp = folder / method / "std.npy"
            stds[label] = np.load(sp) if sp.exists() else None
        if not recons:
            continue
        k = spec.experiment.figure_slice
        if ref.ndim == 3:
            k = ref.shape[0] // 2 if k < 0 else min(k, ref.shape[0] - 1)
            take = lambda v: v[k]  # noqa: E731
            where = f", axial slice z = {k}"
        else:
            take = lambda v: v  # noqa: E731
            where = ""
        title = f"{spec.name} / {case.name} (seed {seed}{where})"
        fig = viz.method_comparison({n: take(v) for n, v in recons.items()},
                                    {n: (take(v) if v is not None else None) for n, v in stds.items()},
                                    take(ref), title=title)
        p = out / "figures" / f"{case.name}_slices.png"
        viz.save_figure(fig, p, dpi=80)
        written.append(p)
        curves = [(n, prepare.coverage_curve(recons[n] - ref, s)) for n, s in stds.items() if s is not None]
        if curves:
            fig = viz.reliability_diagram([c[1][0] for c in curves], [c[1][1] for c in curves],
                                          labels=[c[0] for c in curves], title=f"Calibration: {spec.name} / {case.name}")
            p = out / "figures" / f"{case.name}_calibration.png"
            viz.save_figure(fig, p, dpi=80)
            written.append(p)
    return written
