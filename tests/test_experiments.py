"""Experiment runner end to end on a tiny 2D experiment (32², a 2-scale U-Net, a few iterations).

The numbers are not meant to be good reconstructions; the tests check the runner's contracts:
listing, the table and figures, identical metrics for the same seed (on CPU, fixed threads),
resume after an interruption, sharing the DIP fit between Bayes-DIP sgd and cg, and one-line
errors with exit code 2 for bad input.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dipuq import experiments
from dipuq.cli import main
from dipuq.data.scan import Scan
from dipuq.experiments import load_experiment, normalise_background
from dipuq.geometry import Geometry
from dipuq.run.rundir import RunDir
from dipuq.run.stages import STAGE_NAMES

TINY = """\
[experiment]
title = "tiny runner test"
seeds = 2
quick = ["dip.iterations=10"]

[scan]
source = "phantom"
shape = [32, 32]
noise_level = 0.02

[[case]]
name = "a10"
angles = 10

[methods]
run = ["bayes-sgd", "bayes-cg", "bayes-cal", "mcdo", "fixed-sigma", "oracle-sigma", "fbp", "tv"]
mcdo_samples = 4
tv_iter = 20
cg_max_iter = 20

[pipeline.dip]
iterations = 25
[pipeline.dip.network]
scales = 2
channels = 4
skip_channels = 1
[pipeline.linearise]
diag_probes = 4
[pipeline.posterior]
em_rounds = 1
em_samples = 2
[pipeline.sampler]
n_samples = 4
n_steps = 10
chains_per_batch = 2
power_iters = 5
[pipeline.output]
figures = false
tiff = false
"""


@pytest.fixture()
def exp_dir(tmp_path, monkeypatch):
    d = tmp_path / "experiments"
    d.mkdir()
    (d / "tiny.toml").write_text(TINY)
    monkeypatch.setenv("DIPUQ_EXPERIMENTS", str(d))
    return d


def _metrics(out, seed=0):
    rows = {}
    for p in sorted((out / f"seed{seed}").glob("*/*/result.json")):
        r = json.loads(p.read_text())["row"]
        rows[r["method"]] = {k: v for k, v in r.items() if not k.startswith("time_")}
    return rows


def test_shipped_experiments_load():
    """Every config in the repository's experiments/ parses and validates (no runs)."""
    found = experiments.list_experiments()
    assert {"shepp2d", "cone3d", "cone3d-gpu", "tooth2d", "diamond3d", "psiwood2d"} <= set(found)
    for name in found:
        spec = load_experiment(name)
        assert spec.cases and spec.methods.run
        load_experiment(name, quick=True)


def test_list(exp_dir, capsys):
    assert main(["experiment", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "tiny runner test" in out and "a10" in out


def test_run_resume_and_reproduce(exp_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["experiment", "run", "tiny", "--out", str(out), "--quiet"]) == 0
    # layout: per-seed method folders with markers, tables, figures, provenance
    for seed in (0, 1):
        for m in ("bayes-sgd", "bayes-cg", "bayes-cal", "mcdo", "fixed-sigma", "oracle-sigma", "fbp", "tv"):
            assert (out / f"seed{seed}" / "a10" / m / "result.json").is_file(), (seed, m)
    for f in ("table.md", "table.csv", "results.csv", "provenance.json", "experiment.toml",
              "figures/a10_slices.png", "figures/a10_calibration.png"):
        assert (out / f).is_file(), f
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seeds"] == 2 and prov["threads"] == 1 and "torch" in prov["versions"]
    table = list(csv.DictReader((out / "table.csv").open()))
    assert len(table) == 8 and all(r["n_seeds"] == "2" for r in table)
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 16
    md = (out / "table.md").read_text()
    assert "Bayes-DIP (sgd)" in md and "±" in md
    # point estimates carry no uncertainty metrics; fixed sigma has a constant std (Spearman 0)
    m0 = _metrics(out)
    assert m0["fbp"]["coverage_90"] is None and np.isfinite(m0["fbp"]["psnr"])
    assert m0["fixed-sigma"]["spearman_std_abs_error"] == 0.0
    # the table's metrics are the run's own: computed inside the region every angle sees, like metrics.json
    for m in ("bayes-cal", "bayes-sgd"):
        run_m = json.loads((out / f"seed0/a10/{m}/metrics.json").read_text())
        for k in ("psnr", "coverage_90", "calibration_error", "log_likelihood"):
            assert m0[m][k] == pytest.approx(run_m[k], rel=1e-6, abs=1e-9), (m, k)
    assert m0["fbp"]["psnr"] == pytest.approx(json.loads((out / "seed0/a10/bayes-sgd/metrics.json").read_text())["fbp_psnr"],
                                              rel=1e-5)
    # the cg run reused the sgd run's DIP fit: same reconstruction, its own std
    sgd = np.load(out / "seed0/a10/bayes-sgd/recon.npy")
    np.testing.assert_array_equal(sgd, np.load(out / "seed0/a10/bayes-cg/recon.npy"))
    cg_run = RunDir(out / "seed0/a10/bayes-cg", STAGE_NAMES)
    assert [s for s in STAGE_NAMES if "shared_from" in (cg_run.marker(s) or {})] == ["scan", "fbp", "dip", "linearise"]
    assert cg_run.marker("dip")["shared_from"].endswith("bayes-sgd")
    assert json.loads((out / "seed0/a10/bayes-cg/result.json").read_text())["extra"]["shared_fit"] is True
    # the fixed-σ rows put their constant around that same reconstruction, in the scan's units
    # (the pipeline fits in units divided by the scan's scale; a unit slip would shift the PSNR)
    fixed = np.load(out / "seed0/a10/fixed-sigma/recon.npy")
    np.testing.assert_allclose(fixed, sgd, rtol=1e-5, atol=1e-6 * np.abs(sgd).max())
    assert json.loads((out / "seed0/a10/fixed-sigma/result.json").read_text())["extra"]["shared_fit"] is True
    # the calibrated row differs from bayes-cg only in its calibration: it reuses cg's samples
    cal_run = RunDir(out / "seed0/a10/bayes-cal", STAGE_NAMES)
    assert [s for s in STAGE_NAMES if "shared_from" in (cal_run.marker(s) or {})] == list(STAGE_NAMES[:STAGE_NAMES.index("sampler") + 1])
    assert cal_run.marker("sampler")["shared_from"].endswith("bayes-cg")
    # the calibrated row: the same fit, the cg posterior's std calibrated on the held-out angles
    np.testing.assert_array_equal(sgd, np.load(out / "seed0/a10/bayes-cal/recon.npy"))
    cal_std = np.load(out / "seed0/a10/bayes-cal/std.npy")
    np.testing.assert_allclose(np.load(out / "seed0/a10/bayes-cal/std_raw.npy"),
                               np.load(out / "seed0/a10/bayes-cg/std.npy"), rtol=1e-5)
    assert not np.allclose(cal_std, np.load(out / "seed0/a10/bayes-cg/std.npy"))

    # different seeds differ (noise, initialisation and sampling all depend on the seed)
    assert _metrics(out, 1)["bayes-sgd"]["psnr"] != m0["bayes-sgd"]["psnr"]

    # interruption (in a fresh folder): stop the run in seed 0's mcdo; finished methods are kept
    inter = tmp_path / "inter"
    methods = experiments.METHODS
    orig = dict(methods)

    def failing(cls):  # the method, interrupted when it starts
        def run(self, job):
            raise KeyboardInterrupt
        return type(cls.__name__, (cls,), {"run": run})

    def counted(cls, calls):  # the method, recording each run
        def run(self, job):
            calls.append(self.name)
            return cls.run(self, job)
        return type(cls.__name__, (cls,), {"run": run})

    real = methods["mcdo"]
    monkeypatch.setitem(methods, "mcdo", failing(real))
    assert main(["experiment", "run", "tiny", "--out", str(inter), "--seeds", "1", "--quiet"]) == 130
    done = {p.parent.name: p.stat().st_mtime_ns for p in (inter / "seed0/a10").glob("*/result.json")}
    assert set(done) == {"bayes-sgd", "bayes-cg", "bayes-cal"}
    monkeypatch.setitem(methods, "mcdo", real)
    calls = []
    for name in ("bayes-sgd", "bayes-cg", "bayes-cal"):
        monkeypatch.setitem(methods, name, counted(methods[name], calls))
    capsys.readouterr()
    assert main(["experiment", "run", "tiny", "--out", str(inter), "--seeds", "1"]) == 0
    err = capsys.readouterr().err
    assert calls == [] and err.count("done already, skipping") == 3
    for name, mtime in done.items():
        assert (inter / "seed0/a10" / name / "result.json").stat().st_mtime_ns == mtime
    # the same seed in a fresh folder, interrupted and resumed: identical metrics (bit for bit)
    assert _metrics(inter) == m0
    # a rerun of a finished experiment computes nothing and rewrites the same table
    table_md = (inter / "table.md").read_text()
    for name in list(methods):
        monkeypatch.setitem(methods, name, failing(methods[name]))
    assert main(["experiment", "run", "tiny", "--out", str(inter), "--seeds", "1", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert (inter / "table.md").read_text() == table_md
    # a change of the [refit] section reruns the methods that read it (the pipeline runs, from their
    # refit stage, and the fixed-σ rows around their reconstruction) and no other
    calls = []
    for name, cls in orig.items():
        monkeypatch.setitem(methods, name, counted(cls, calls))
    assert main(["experiment", "run", "tiny", "--out", str(inter), "--seeds", "1", "--quiet",
                 "--set", "refit.steps=3"]) == 0
    assert sorted(calls) == ["bayes-cal", "bayes-cg", "bayes-sgd", "fixed-sigma", "oracle-sigma"]
    assert json.loads((inter / "seed0/a10/bayes-cal/stages/08_refit/refit.json").read_text())["steps"] == 3
    # ... and of the [calibration] section the pipeline runs only (same folder, not "a different spec")
    calls.clear()
    assert main(["experiment", "run", "tiny", "--out", str(inter), "--seeds", "1", "--quiet",
                 "--set", "refit.steps=3", "--set", "calibration.bootstrap=4"]) == 0
    assert sorted(calls) == ["bayes-cal", "bayes-cg", "bayes-sgd"]
    cal = json.loads((inter / "seed0/a10/bayes-cal/stages/07_calibrate/calibration.json").read_text())
    assert cal["bootstrap"]["replicates"] == 4


def test_bad_input_one_line_exit_2(exp_dir, tmp_path, capsys):
    cases = [
        ["experiment", "run", "nosuch"],
        ["experiment", "run", "tiny", "--seeds", "0"],
        ["experiment", "run", "tiny", "--seeds", "two"],
        ["experiment", "run", "tiny", "--set", "dip.iteratons=5"],
        ["experiment", "run", "tiny", "--set", "methods.run=bayes-sgd,magic"],
        ["experiment", "run", "tiny", "--set", "scan.shape=4,4"],
        ["experiment", "run", "tiny", "--cases", "a99"],
    ]
    errs = []
    for argv in cases:
        assert main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("dipuq: error:") and "\n" not in err, (argv, err)
        errs.append(err)
    assert "available: tiny" in errs[0]
    assert "did you mean 'iterations'" in errs[3]
    assert "magic" in errs[4]
    assert not (tmp_path / "x").exists()  # nothing written for bad input
    # a folder holding another spec is refused, not overwritten
    out = tmp_path / "run"
    assert main(["experiment", "run", "tiny", "--out", str(out), "--quiet", "--seeds", "1",
                 "--set", "methods.run=fbp"]) == 0
    assert main(["experiment", "run", "tiny", "--out", str(out), "--quiet", "--seeds", "1",
                 "--set", "methods.run=tv"]) == 2
    assert "different spec" in capsys.readouterr().err


def test_quick_overrides_and_prefix(exp_dir):
    spec = load_experiment("tiny", ["sampler.n_samples=6", "pipeline.dip.lr=0.01"], quick=True)
    assert spec.pipeline.dip.iterations == 10  # from experiment.quick
    assert spec.pipeline.sampler.n_samples == 6 and spec.pipeline.dip.lr == 0.01
    assert load_experiment("tiny").pipeline.dip.iterations == 25


def test_normalise_background():
    """A constant air offset per projection is removed exactly (edges are air)."""
    g = Geometry.parallel3d(np.linspace(0, np.pi, 4, endpoint=False), (3, 20, 20), det_shape=(3, 30))
    p = np.zeros((4, 3, 30), np.float32)
    p[:, :, 10:20] = 1.0
    offset = np.array([0.35, 0.4, 0.3, 0.38], np.float32)
    scan = Scan(p + offset[:, None, None], g)
    out, levels = normalise_background(scan, edge_cols=5)
    np.testing.assert_allclose(levels, offset, atol=1e-6)  # float32 rounding
    np.testing.assert_allclose(out.projections, p, atol=1e-6)
