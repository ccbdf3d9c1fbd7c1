"""Calibration on held-out projections: the variance-model fit, its reliability diagram, and the stage.

The statistical tests draw from exactly known Gaussians / Student-t's with fixed seeds; the
tolerances are a few binomial or sampling standard errors, stated where used.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dipuq.maps.calibration import (
    RELIABILITY_LEVELS,
    HeldoutPredictive,
    VarianceModel,
    calibrate,
    coverage_by_level,
    fit_variance_model,
    interval_multiplier,
)
from dipuq.run.config import load_config
from dipuq.data.phantoms import shepp_logan
from dipuq.operators.simulate import simulate_scan
from dipuq.geometry import Geometry
from dipuq.run.pipeline import run_pipeline


def _linear_gaussian(sigma2=0.04, g=1e4, d=40, m_fit=120, m_held=8, reps=400, seed=0):
    """Held-out residuals of an exact linear-Gaussian posterior, y = A x + η, x ~ N(0, g I).

    Returns the residual draws r_H = y_H − A_H μ(y_F) (exact predictive N(0, A_H Σ A_Hᵀ + σ² I)),
    and the predictive variance diag(A_H Σ' A_Hᵀ) of the posterior Σ' computed with σ²/10. With
    g ≫ the data-dominated regime Σ' = Σ/10 up to O(σ²/g), so the truth is c = 10, σ² = sigma2.
    """
    rng = np.random.default_rng(seed)
    A_F = rng.normal(size=(m_fit, d)) / np.sqrt(d)
    A_H = rng.normal(size=(m_held, d)) * rng.uniform(0.3, 3.0, size=(m_held, 1)) / np.sqrt(d)

    def post_cov(s2):
        return np.linalg.inv(A_F.T @ A_F / s2 + np.eye(d) / g)

    S = post_cov(sigma2)
    pred_cov = A_H @ S @ A_H.T + sigma2 * np.eye(m_held)
    r = rng.multivariate_normal(np.zeros(m_held), pred_cov, size=reps)  # (reps, m_held)
    s_wrong = np.diag(A_H @ post_cov(sigma2 / 10) @ A_H.T)
    groups = np.broadcast_to(np.arange(reps)[:, None] % 4, r.shape)  # 4 folds of replicates
    return HeldoutPredictive(r, np.broadcast_to(s_wrong, r.shape), None, sigma2 / 10, groups)


def test_overconfident_posterior_is_recalibrated():
    pred = _linear_gaussian()
    m = fit_variance_model(pred, terms="scale", noise="fit", tails="gaussian")
    # 3200 rays: the MLE's relative standard errors are ~5 %, so 20 % is about 4 of them
    assert m.scale == pytest.approx(10.0, rel=0.2)
    assert m.sigma2 == pytest.approx(0.04, rel=0.2)
    raw = VarianceModel(1.0, 0.0, pred.sigma2, None)
    assert m.log_likelihood(pred) > raw.log_likelihood(pred) + 0.5
    model, report = calibrate(pred)
    assert report["heldout_log_likelihood_cv"] > report["heldout_log_likelihood_raw"]
    lv = np.asarray(report["levels"])
    # out-of-fold coverage of the calibrated model: within 0.04 (≈ 4 binomial s.e. at n = 3200)
    assert np.max(np.abs(np.asarray(report["coverage_calibrated"]) - lv)) < 0.04
    assert report["coverage_raw"][list(lv).index(0.9)] < 0.6  # the raw posterior was far too narrow


def test_reliability_diagram_on_synthetic_gaussians():
    rng = np.random.default_rng(1)
    v = rng.uniform(0.1, 5.0, 20000)
    r = rng.normal(0, np.sqrt(v))
    cov = coverage_by_level(r, v, None)
    tol = 4 * np.sqrt(np.asarray(RELIABILITY_LEVELS) * (1 - np.asarray(RELIABILITY_LEVELS)) / v.size)
    assert np.all(np.abs(cov - np.asarray(RELIABILITY_LEVELS)) < tol)  # 4 binomial standard errors
    assert np.all(coverage_by_level(r, 4 * v, None) > np.asarray(RELIABILITY_LEVELS))  # too wide: above
    assert np.all(coverage_by_level(r, v / 4, None) < np.asarray(RELIABILITY_LEVELS))  # too narrow: below


def test_heavy_tails_get_a_student_shape():
    rng = np.random.default_rng(2)
    v = rng.uniform(0.5, 2.0, 8000)
    r = rng.standard_t(4, v.size) * np.sqrt(v)  # t_4 has variance 2: the truth is c = 2, ν = 4
    pred = HeldoutPredictive(r, v, None, 1e-6, np.repeat(np.arange(4), 2000))
    model, report = calibrate(pred, terms="scale", noise="posterior", tails="auto")
    assert report["model"] == "scale/student" and 3.0 < model.df < 6.0  # ν̂ of 8000 t_4 draws: s.e. ≈ 0.3
    assert np.max(np.abs(np.asarray(report["coverage_calibrated"]) - np.asarray(report["levels"]))) < 0.03
    # a Gaussian with the same variance misses the 50 % level by far more
    gauss = fit_variance_model(pred, "scale", "posterior", "gaussian")
    assert abs(coverage_by_level(r, gauss.ray_variance(pred), None)[9] - 0.5) > 0.05


def test_interval_multiplier():
    assert interval_multiplier(0.9, None) == pytest.approx(1.6449, abs=1e-4)
    assert interval_multiplier(0.9, 1000.0) == pytest.approx(1.6449, abs=2e-3)  # ν → ∞ is Gaussian
    assert interval_multiplier(0.5, 4.0) < interval_multiplier(0.5, None)  # heavy tails: narrow centre ...
    assert interval_multiplier(0.99, 4.0) > interval_multiplier(0.99, None)  # ... wide tails


# -- the stage in the pipeline ----------------------------------------------------------------

TINY = {
    "dip.iterations": 60, "dip.network.scales": 2, "dip.network.channels": 4, "dip.network.skip_channels": 1,
    "linearise.diag_probes": 4, "posterior.em_rounds": 0, "sampler.method": "exact", "sampler.n_samples": 8,
    "output.report": False, "output.tiff": False,
}


@pytest.fixture(scope="module")
def scan():
    g = Geometry.parallel2d(np.linspace(0, np.pi, 20, endpoint=False), (32, 32))
    return simulate_scan(shepp_logan((32, 32)), g, noise="gaussian", noise_level=0.02,
                         generator=torch.Generator().manual_seed(0), name="tiny")


def test_calibrate_stage_outputs(scan, tmp_path):
    res = run_pipeline(scan, load_config(None).replace(TINY), tmp_path / "run", seed=0, progress=False)
    run = res.run_dir
    cal = json.loads((run / "stages" / "07_calibrate" / "calibration.json").read_text())
    assert cal["enabled"] and cal["n_angles"] == 3 and cal["parameters"]["scale"] > 0  # 20 angles: data.holdout_min = 3 held out
    std_raw = np.load(run / "std_raw.npy")
    assert std_raw.shape == res.std.shape and not np.allclose(std_raw, res.std)
    m = res.metrics
    for k in ("heldout_coverage_90", "heldout_coverage_90_raw", "calibration_scale", "raw_coverage_90"):
        assert k in m
    assert (run / "figures" / "heldout_reliability.png").stat().st_size > 1000
    # off: today's behaviour, the raw std
    off = run_pipeline(scan, load_config(None).replace({**TINY, "calibration.enabled": False}), tmp_path / "off",
                       seed=0, progress=False)
    np.testing.assert_array_equal(off.std, np.load(off.run_dir / "std_raw.npy"))
    np.testing.assert_allclose(off.std, std_raw, rtol=1e-6)
    assert json.loads((off.run_dir / "stages" / "07_calibrate" / "calibration.json").read_text())["enabled"] is False


def test_heldout_rows_never_reach_the_pipeline_fit(scan, tmp_path):
    from dipuq.data.split import ProjectionSplit

    # stop = none: the kept iterate is then chosen by the training loss alone (with the validation
    # stop it is chosen by the held-out loss, by design)
    cfg = load_config(None).replace({**TINY, "output.figures": False, "dip.stop": "none"})
    base = run_pipeline(scan, cfg, tmp_path / "a", seed=0, progress=False)
    split = ProjectionSplit.load(base.run_dir / "stages" / "01_scan" / "split.json")
    # the scale (norm) comes from the FBP of the fitted angles only, so it is unchanged too
    y = scan.projections.copy()
    y[list(split.held)] = 5.0 * y[list(split.held)] + 1.0
    other = run_pipeline(scan.replace(projections=y), cfg, tmp_path / "b", seed=0, progress=False)
    h0, h1 = (torch.load(r.run_dir / "stages" / "03_dip" / "dip.pt", weights_only=True)["history"] for r in (base, other))
    assert h0["loss"] == h1["loss"] and h0["val"] != h1["val"]
    # ... and the posterior samples are the same: the std maps before calibration agree
    np.testing.assert_array_equal(np.load(base.run_dir / "std_raw.npy"), np.load(other.run_dir / "std_raw.npy"))


@pytest.mark.parametrize("seed,needle", [(2, "no trace"), (3, "disagree")])
def test_unusable_calibration_falls_back_to_the_raw_posterior(seed, needle):
    # heavy-tailed held-out residuals that the posterior variance does not explain (3 angles of 96
    # rays): the fitted noise term absorbs them and c → 0 in every fold (seed 2) or in some folds
    # only (seed 3). Either way an image-space std of ~0 must not come out: the raw posterior stays.
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(3), 96)
    pv = rng.uniform(0.01, 1.0, groups.size)
    pred = HeldoutPredictive(rng.standard_t(2.5, groups.size), pv, None, sigma2=0.05, groups=groups)
    model, report = calibrate(pred)
    assert report["model"] == "raw" and needle in report["fallback"]
    assert (model.scale, model.prior_weight, model.sigma2, model.df) == (1.0, 0.0, 0.05, None)
    assert json.dumps(report)  # JSON-able, fallback included


def test_limited_angle_scan_is_flagged(scan, tmp_path):
    """A 100° arc: the run warns that the held-out angles cannot see the missing wedge, records its
    width in calibration.json and metrics.json, and puts the warning in the report; the full
    180° scan of the fixture has none."""
    from dipuq.run.context import RunContext
    from dipuq.run.rundir import RunDir
    from dipuq.run.stages import STAGE_NAMES, loaders
    from dipuq.run.stages.show import _run_warnings

    g = Geometry.parallel2d(np.radians(np.linspace(0, 100, 20)), (32, 32))
    lim = simulate_scan(shepp_logan((32, 32)), g, noise="gaussian", noise_level=0.02,
                        generator=torch.Generator().manual_seed(0), name="limited")
    cfg = load_config(None).replace({**TINY, "output.figures": False, "dip.iterations": 20, "refit.steps": 0})
    logs = []
    res = run_pipeline(lim, cfg, tmp_path / "lim", seed=0, progress=False, log=logs.append)
    assert any("no view measures a 75° wedge" in line for line in logs)  # 80° less one step of 100/19°
    cal = json.loads((res.run_dir / "stages" / "07_calibrate" / "calibration.json").read_text())
    assert cal["missing_wedge_deg"] == pytest.approx(80 - 100 / 19)
    assert res.metrics["missing_wedge_deg"] == cal["missing_wedge_deg"]
    ctx = RunContext(RunDir(res.run_dir, STAGE_NAMES), cfg, 0, torch.device("cpu"), False, loaders=loaders())
    assert any("wedge" in w for w in _run_warnings(ctx))
    full = run_pipeline(scan, cfg, tmp_path / "full", seed=0, progress=False)
    assert "missing_wedge_deg" not in full.metrics
