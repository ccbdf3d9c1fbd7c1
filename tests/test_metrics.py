"""Metrics on Gaussians and images with known answers."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dipuq.maps.metrics import (
    PatchCovariance, calibration_error, coverage, crps_gaussian, gaussian_log_likelihood, patch_log_likelihood, psnr,
    spearman, ssim, uncertainty_metrics,
)

N = 200_000  # voxels: Monte Carlo errors below are ~1/sqrt(N) = 0.2 %


@pytest.fixture(scope="module")
def gauss():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=N)
    std = rng.uniform(0.5, 2.0, size=N)
    ref = mean + std * rng.normal(size=N)  # the reference is a draw from the predictive: calibrated
    return ref, mean, std


def test_psnr_and_ssim_known_values():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(32, 32))
    assert psnr(x + 0.01, x, data_range=1.0) == pytest.approx(40.0)
    assert psnr(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0)
    # constant images a, b: SSIM = (2ab + c1)/(a² + b² + c1) exactly (no structure term)
    a, b = np.full((16, 16), 0.3), np.full((16, 16), 0.5)
    c1 = (0.01 * 1.0) ** 2
    assert ssim(a, b, data_range=1.0) == pytest.approx((2 * 0.15 + c1) / (0.09 + 0.25 + c1), rel=1e-12)
    v = rng.uniform(size=(16, 16, 16))
    assert ssim(v, v) == pytest.approx(1.0)
    assert ssim(v + 0.2 * rng.normal(size=v.shape), v) < 0.9
    assert ssim(x, x + 0.1) == pytest.approx(ssim(x + 0.1, x), rel=1e-12)  # symmetric


def test_gaussian_log_likelihood(gauss):
    ref, mean, std = gauss
    expected = np.mean(-0.5 - np.log(std) - 0.5 * math.log(2 * math.pi))
    # the −½z² term has s.d. sqrt(0.5/N) = 0.0016; 0.01 is 6 s.d.
    assert gaussian_log_likelihood(ref, mean, std) == pytest.approx(expected, abs=0.01)
    # matches scipy voxel by voxel
    assert gaussian_log_likelihood(ref[:100], mean[:100], std[:100]) == pytest.approx(
        stats.norm.logpdf(ref[:100], mean[:100], std[:100]).mean(), rel=1e-12)


def test_coverage_and_calibration(gauss):
    ref, mean, std = gauss
    cov = coverage(ref, mean, std)
    for lv, c in cov.items():  # binomial s.d. ≤ sqrt(0.25/N) = 0.0011
        assert c == pytest.approx(lv, abs=0.006)
    assert calibration_error(ref, mean, std) < 0.006
    # std twice too large: coverage(ℓ) = 2Φ(2 z_ℓ) − 1, so calibration error is known
    levels = (0.5, 0.9)
    got = coverage(ref, mean, 2 * std, levels)
    for lv in levels:
        want = 2 * stats.norm.cdf(2 * stats.norm.ppf(0.5 + lv / 2)) - 1
        assert got[lv] == pytest.approx(want, abs=0.006)
    want_ce = np.mean([abs(2 * stats.norm.cdf(2 * stats.norm.ppf(0.5 + lv / 2)) - 1 - lv) for lv in levels])
    assert calibration_error(ref, mean, 2 * std, levels) == pytest.approx(want_ce, abs=0.006)


def test_spearman_and_crps(gauss):
    ref, mean, std = gauss
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=500), rng.normal(size=500)
    b = a + b
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, rel=1e-12)
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert spearman(np.round(a), np.round(b)) == pytest.approx(stats.spearmanr(np.round(a), np.round(b)).statistic)
    # calibrated std and |error| = std·|z|: rank correlation is clearly positive
    assert spearman(std, np.abs(ref - mean)) > 0.2
    # CRPS at t = 0 is σ(2φ(0) − 1/√π); its expectation under the predictive itself is σ/√π
    assert crps_gaussian(np.zeros(3), np.zeros(3), np.full(3, 2.0)) == pytest.approx(
        2 * (2 / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi)), rel=1e-12)
    # E|X − x| − ½E|X − X'| by Monte Carlo for one point
    x0, mu, s = 0.7, 0.2, 1.3
    X = mu + s * rng.normal(size=400_000)
    mc = np.mean(np.abs(X - x0)) - 0.5 * np.mean(np.abs(X - rng.permutation(X)))
    assert crps_gaussian([x0], [mu], [s]) == pytest.approx(mc, abs=0.01)  # MC s.d. ≈ 0.002
    assert crps_gaussian(ref, mean, std) == pytest.approx(np.mean(std) / math.sqrt(math.pi), rel=0.01)
    assert crps_gaussian([1.0], [0.0], [1e-9]) == pytest.approx(1.0, rel=1e-6)  # → |x − μ|


def test_patch_log_likelihood_known_covariance():
    rng = np.random.default_rng(3)
    shape, p = (8, 8), 4
    # correlated Gaussian field: each 4x4 patch has covariance C = L Lᵀ (patches independent)
    P = p * p
    L = np.tril(rng.normal(size=(P, P))) * 0.3 + np.eye(P)
    C = L @ L.T
    cov = PatchCovariance(shape, patch=p)

    def field(n):
        z = L @ rng.normal(size=(P, n * 4))  # (P, n·patches)
        t = torch.as_tensor(z.T.reshape(n, 2, 2, p, p)).permute(0, 1, 3, 2, 4).reshape(n, 8, 8)
        return t

    for _ in range(20):
        cov.update(field(500))
    ref = field(1)[0].numpy()
    got = patch_log_likelihood(ref, np.zeros(shape), cov, jitter=0.0)
    r = cov.patches(torch.as_tensor(ref)[None])[0].numpy()
    want = np.mean([stats.multivariate_normal(np.zeros(P), C).logpdf(ri) for ri in r]) / P
    # 10 000 samples of a 16-dim covariance: log-det and quadratic form within ≈ 1 % (measured 0.2 %)
    assert got == pytest.approx(want, rel=0.02)
    # with 1×1 patches it reduces to the voxel-wise Gaussian log-likelihood with the sample std
    c1 = PatchCovariance(shape, patch=1).update(field(300))
    std = np.sqrt(c1.covariance().numpy().reshape(shape))
    assert patch_log_likelihood(ref, np.zeros(shape), c1, jitter=0.0) == pytest.approx(
        gaussian_log_likelihood(ref, np.zeros(shape), std), rel=1e-10)
    # 3D layout and merge
    a = PatchCovariance((4, 4, 4), patch=2).update(torch.randn(3, 4, 4, 4))
    b = PatchCovariance((4, 4, 4), patch=2).update(torch.randn(2, 4, 4, 4))
    assert a.merge(b).n == 5 and a.S.shape == (8, 8, 8)


def test_uncertainty_metrics_bundle(gauss):
    ref, mean, std = gauss
    m = uncertainty_metrics(ref[:4096].reshape(64, 64), mean[:4096].reshape(64, 64), std[:4096].reshape(64, 64))
    assert {"psnr", "ssim", "log_likelihood", "coverage_50", "coverage_90", "coverage_95", "calibration_error",
            "spearman_std_abs_error", "crps"} <= set(m)
    assert m["coverage_90"] == pytest.approx(0.9, abs=0.03)  # 4096 voxels: binomial s.d. 0.005
