"""Phantoms and simulated scans: values, reproducibility, noise statistics, NPZ output."""

import numpy as np
import pytest
import torch

from dipuq.data import Scan, random_ellipsoids, shepp_logan
from dipuq.errors import DataError
from dipuq.geometry import Geometry
from dipuq.operators import MatrixOperator, simulate_scan


def test_shepp_logan_2d_values():
    x = shepp_logan((128, 128))
    assert x.shape == (128, 128) and x.dtype == np.float32
    # modified Shepp–Logan: background/ventricles 0, features 0.1-0.4, brain 0.2, skull 1
    np.testing.assert_allclose(np.unique(np.round(x, 4)), [0.0, 0.1, 0.2, 0.3, 0.4, 1.0], atol=1e-6)
    assert x[64, 64] == pytest.approx(0.2)  # centre: brain
    assert x[5, 64] == 1.0  # top (y = +0.92): skull, so imshow shows the usual upright picture
    assert x[64, 5] == 0.0  # left of the skull (x = -0.92 > 0.69): air
    assert x[64 - 22, 64] == pytest.approx(0.3)  # y = +0.35: the 0.1 ellipse on brain


def test_shepp_logan_3d():
    x = shepp_logan((16, 32, 32))
    assert x.shape == (16, 32, 32) and x.min() == 0.0 and x.max() == 1.0
    assert x[8, 16, 16] == pytest.approx(0.2)
    assert x[0].max() <= x[8].max()  # the ellipsoid shell closes towards the ends


def test_random_ellipsoids_reproducible_and_in_range():
    a = random_ellipsoids((32, 32), torch.Generator().manual_seed(3))
    b = random_ellipsoids((32, 32), torch.Generator().manual_seed(3))
    c = random_ellipsoids((32, 32), torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for x in (a, random_ellipsoids((8, 16, 16), torch.Generator().manual_seed(0))):
        assert x.min() >= 0 and 0.1 <= x.max() <= 1.0 and (x > 0).mean() > 0.02
    with pytest.raises(DataError, match="torch.Generator"):
        random_ellipsoids((8, 8), 0)


# -- simulation ---------------------------------------------------------------------------------
def _constant_ray_operator(n_angles=100, det=41, levels=(1.0, 0.25)):
    """A dense A on an 8×8 volume whose rays see line integral levels[0] or levels[1] (alternating) of x = 1."""
    g = Geometry.parallel2d(np.linspace(0, np.pi, n_angles, endpoint=False), (8, 8), det)
    m = n_angles * det
    lv = torch.tensor(levels, dtype=torch.float32)[torch.arange(m) % 2]
    M = lv[:, None].expand(m, 64) / 64
    return g, MatrixOperator(M.contiguous(), (8, 8), g.proj_shape), lv.reshape(g.proj_shape).numpy()


def test_poisson_noise_statistics():
    g, A, y0 = _constant_ray_operator()
    s = simulate_scan(np.ones((8, 8)), g, operator=A, noise="poisson", photons=1e4,
                      generator=torch.Generator().manual_seed(0))
    mu = 2.0  # default: the most attenuating ray (line integral 1) keeps exp(-2) of the photons
    assert s.meta["mu"] == pytest.approx(mu) and s.meta["max_attenuation"] == pytest.approx(2.0)
    for level in (1.0, 0.25):
        r = s.projections[y0 == level]  # 2050 i.i.d. samples
        rate = 1e4 * np.exp(-mu * level)
        std = 1 / (mu * np.sqrt(rate))  # delta method: Var[-log N / mu] = 1 / (mu² I0 e^{-mu L})
        # sample std of 2050 values: relative standard error 1/sqrt(2·2050) = 1.6 % -> 6 % is ~4 SE
        assert r.std() == pytest.approx(std, rel=0.06)
        # mean: standard error std/45 ≤ 3e-4, bias 1/(2 mu rate) ≤ 4e-4 -> 2e-3 is a broken scaling
        assert r.mean() == pytest.approx(level, abs=2e-3)
    rms = np.sqrt(np.mean([1 / (mu ** 2 * 1e4 * np.exp(-mu * v)) for v in (1.0, 0.25)]))
    assert s.noise_std == pytest.approx(rms, rel=1e-4)
    np.testing.assert_array_equal(s.reference, np.ones((8, 8)))


def test_poisson_with_explicit_mu_and_starved_rays_stays_finite():
    g, A, _ = _constant_ray_operator(n_angles=4, det=9)
    s = simulate_scan(np.ones((8, 8)), g, operator=A, noise="poisson", photons=2, mu=3.0,
                      generator=torch.Generator().manual_seed(0))
    assert np.isfinite(s.projections).all() and s.meta["zero_counts"] > 0
    assert s.projections.max() <= np.log(2) / 3 + 1e-6  # zero counts are clipped to 1 photon


def test_gaussian_noise_statistics_and_reproducibility():
    g, A, y0 = _constant_ray_operator()
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    s = simulate_scan(np.ones((8, 8)), g, operator=A, noise="gaussian", noise_level=0.05, generator=gen())
    sigma = 0.05 * np.abs(y0).mean()
    assert s.noise_std == pytest.approx(sigma, rel=1e-6)
    # 4100 samples: relative SE of the std 1.1 % -> 5 %
    assert (s.projections - y0).std() == pytest.approx(sigma, rel=0.05)
    t = simulate_scan(np.ones((8, 8)), g, operator=A, noise="gaussian", noise_level=0.05, generator=gen())
    np.testing.assert_array_equal(s.projections, t.projections)


def test_simulate_with_ray_transform_and_save(tmp_path):
    from dipuq.operators import RayTransform

    g = Geometry.parallel2d(np.linspace(0, np.pi, 30, endpoint=False), (32, 32))
    x = shepp_logan((32, 32))
    s = simulate_scan(x, g, noise=None, name="sl32")
    A = RayTransform(g)
    np.testing.assert_allclose(s.projections, A(torch.from_numpy(x)).numpy(), rtol=1e-6)
    assert s.noise_std is None and s.meta["backend"] == A.backend
    t = Scan.load(s.save(tmp_path / "sl32.npz"))
    np.testing.assert_array_equal(t.projections, s.projections)
    np.testing.assert_array_equal(t.reference, x)
    assert t.meta["simulated"] is True and t.name == "sl32"


def test_simulate_3d_parallel():
    g = Geometry.parallel3d(np.linspace(0, np.pi, 12, endpoint=False), (8, 16, 16))
    s = simulate_scan(shepp_logan((8, 16, 16)), g, noise="poisson", generator=torch.Generator().manual_seed(0))
    assert s.projections.shape == g.proj_shape and s.reference.shape == (8, 16, 16)


def test_simulate_errors():
    g, A, _ = _constant_ray_operator(n_angles=2, det=9)
    x = np.ones((8, 8))
    with pytest.raises(DataError, match="phantom shape"):
        simulate_scan(np.ones((4, 4)), g, operator=A, noise=None)
    with pytest.raises(DataError, match="unknown noise model"):
        simulate_scan(x, g, operator=A, noise="speckle")
    with pytest.raises(DataError, match="needs generator"):
        simulate_scan(x, g, operator=A, noise="gaussian")
    with pytest.raises(DataError, match="nothing attenuates"):
        simulate_scan(np.zeros((8, 8)), g, operator=A, noise="poisson", generator=torch.Generator())
    with pytest.raises(DataError, match="operator maps"):
        simulate_scan(x, g.subset([0]), operator=A, noise=None)
