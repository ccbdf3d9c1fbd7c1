"""Baselines: registry, TV-LS vs FBP, PDHG identities, MC dropout, fixed-σ DIP, bad input."""

import math

import pytest
import torch

from dipuq.dip.baselines import (
    BASELINES,
    Baseline,
    DipMCDO,
    FixedSigmaDip,
    TVLeastSquares,
    gradient,
    gradient_adjoint,
    make_baseline,
    mc_dropout_moments,
    noise_equivalent_std,
    oracle_constant_std,
    tv_pdhg,
)
from dipuq.dip.fit import DipConfig, tv_anisotropic
from dipuq.errors import ConfigError, DataError
from dipuq.dip.networks import NetworkConfig, UNet
from dipuq.operators import MatrixOperator


def test_registry():
    assert {"fbp", "fdk", "sirt", "cgls", "tv", "dip", "mcdo", "fixed-sigma"} <= set(BASELINES)
    b = make_baseline("tv", lam=0.2, n_iter=10)
    assert isinstance(b, TVLeastSquares) and isinstance(b, Baseline) and b.lam == 0.2
    m = make_baseline("mcdo", config={"iterations": 5, "network": {"dropout": 0.2}}, n_samples=3)
    assert isinstance(m.config, DipConfig) and m.config.network.dropout == 0.2
    with pytest.raises(ConfigError, match="unknown baseline"):
        make_baseline("art")
    with pytest.raises(ConfigError, match="unknown parameters"):
        make_baseline("tv", lambda_=1.0)
    with pytest.raises(ConfigError, match="dropout"):
        make_baseline("mcdo", config={"iterations": 5})


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6)])
def test_gradient_adjoint_and_tv(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    q = torch.randn((len(shape), *shape), dtype=torch.float64, generator=g)
    lhs = (gradient(x, len(shape)) * q).sum()
    rhs = (x * gradient_adjoint(q, len(shape))).sum()
    assert float(abs(lhs - rhs)) < 1e-12 * float(lhs.abs() + 1)  # exact up to float64 round-off
    assert float(gradient(x, len(shape)).abs().sum() / x.numel()) == pytest.approx(float(tv_anisotropic(x)))


def test_classical_baselines_run(sparse2d, psnr):
    A, y, x, _ = sparse2d
    for name, opts in (("fbp", {}), ("sirt", {"n_iter": 20}), ("cgls", {"n_iter": 5})):
        res = make_baseline(name, **opts).reconstruct(A, y)
        assert res.recon.shape == (32, 32) and res.std is None and torch.isfinite(res.recon).all()
        assert psnr(res.recon, x) > 10  # sanity only: each is a reconstruction, not noise


def test_tv_least_squares_beats_fbp(sparse2d, psnr):
    A, y, x, _ = sparse2d
    p_fbp = psnr(make_baseline("fbp").reconstruct(A, y).recon, x)
    res = TVLeastSquares(lam=0.3, n_iter=300).reconstruct(A, y)
    p_tv = psnr(res.recon, x)
    # measured: FBP 16.9 dB, TV-LS 20.7-20.9 dB (λ = 0.3, 300-4000 PDHG steps). Require 2 dB.
    assert p_tv > p_fbp + 2.0, (p_tv, p_fbp)
    assert res.recon.min() >= 0  # nonnegativity constraint


def test_pdhg_decreases_objective_and_converges():
    g = torch.Generator().manual_seed(0)
    A = MatrixOperator(torch.randn(30, 36, generator=g, dtype=torch.float64), (6, 6), (30,))
    x = torch.zeros(6, 6, dtype=torch.float64)
    x[1:4, 2:5] = 1
    y = A(x) + 0.05 * torch.randn(30, generator=g, dtype=torch.float64)
    objs = [s.objective for s in tv_pdhg(A, y, 0.05, 3000, nonneg=False, objective_every=500)]
    objs = [o for o in objs if not math.isnan(o)]
    assert objs[-1] <= objs[0] + 1e-12
    # converged: the last 1000 steps change the objective by < 1e-6 relative (measured ~1e-10)
    assert abs(objs[-1] - objs[-3]) < 1e-6 * objs[-1]
    # λ = 0 is least squares: matches the normal-equation solution (m = 30 < d = 36 → min-norm is
    # not what PDHG finds, so compare residuals instead: both fit y to round-off)
    x0 = None
    for s in tv_pdhg(A, y, 0.0, 3000, nonneg=False):
        x0 = s.x
    assert float((A(x0) - y).norm()) < 1e-3 * float(y.norm())  # measured ~1e-5 relative


def test_mcdo_std_positive_and_varies(sparse2d):
    A, y, _, _ = sparse2d
    cfg = DipConfig(iterations=60, lr=2e-3, gamma=1.0,
                    network=NetworkConfig(scales=2, channels=8, skip_channels=2, dropout=0.2))
    res = DipMCDO(cfg, n_samples=8).reconstruct(A, y, generator=torch.Generator().manual_seed(0))
    assert res.std.shape == res.recon.shape == (32, 32)
    assert (res.std > 0).all() and float(res.std.std()) > 0.1 * float(res.std.mean())  # spatially varying
    res2 = DipMCDO(cfg, n_samples=8).reconstruct(A, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.std, res2.std)  # deterministic for a fixed generator


def test_mc_dropout_moments_match_batch():
    net = UNet(2, scales=2, channels=4, skip_channels=1, dropout=0.3, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    mean, std = mc_dropout_moments(net, z, 12, torch.Generator().manual_seed(2))
    net.set_dropout(True, torch.Generator().manual_seed(2))
    with torch.no_grad():
        samples = torch.stack([net(z)[0, 0] for _ in range(12)])
    net.set_dropout(False)
    assert torch.allclose(mean, samples.mean(0), atol=1e-6)  # Welford vs two-pass, float32 round-off
    assert torch.allclose(std, samples.std(0), atol=1e-6)
    with pytest.raises(ConfigError, match="dropout"):
        mc_dropout_moments(UNet(2, scales=2, channels=4, skip_channels=1), z, 4)


def test_fixed_sigma_dip(sparse2d):
    A, y, x, _ = sparse2d
    cfg = DipConfig(iterations=30, lr=2e-3, gamma=1.0, network=NetworkConfig(scales=2, channels=8, skip_channels=2))
    res = FixedSigmaDip(cfg).reconstruct(A, y, generator=torch.Generator().manual_seed(0))
    c = res.meta["constant_std"]
    assert c > 0 and torch.equal(res.std, torch.full_like(res.recon, c))
    dip = res.meta["dip"]
    # other probes (the fit consumed the generator): Hutchinson over 16 probes of a 564 × 1024 ray
    # transform with many comparable singular values; measured relative difference 5e-5
    assert c == pytest.approx(noise_equivalent_std(A, dip.residual_sigma2, generator=torch.Generator().manual_seed(0)), rel=1e-2)
    assert FixedSigmaDip(cfg, sigma=0.1).reconstruct(A, y, result=dip).std.max() == pytest.approx(0.1)
    assert oracle_constant_std(res.recon, x) == pytest.approx(float((res.recon - x).square().mean().sqrt()))


def test_noise_equivalent_std_dense_oracle():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 16, generator=g, dtype=torch.float64)
    A = MatrixOperator(M, (4, 4), (20,))
    c = noise_equivalent_std(A, 0.5, n_probes=4000, generator=g)
    exact = math.sqrt(0.5 * 20 / float(M.square().sum()))
    assert c == pytest.approx(exact, rel=0.03)  # Hutchinson with 4000 probes: ~1 % std error


def test_bad_input(sparse2d):
    A, y, _, _ = sparse2d
    bad = y.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(DataError, match="NaN/inf"):
        TVLeastSquares(n_iter=5).reconstruct(A, bad)
    with pytest.raises(DataError, match="range shape"):
        TVLeastSquares(n_iter=5).reconstruct(A, y[:5])
    with pytest.raises(ConfigError, match="n_iter"):
        TVLeastSquares(n_iter=0)
    with pytest.raises(ConfigError, match="lam"):
        TVLeastSquares(lam=-1.0)
