"""The equivariant bootstrap's model-error term (dipuq.maps.bootstrap) and its place in the calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dipuq.data.phantoms import shepp_logan
from dipuq.geometry import Geometry
from dipuq.errors import DipuqError
from dipuq.maps.bootstrap import bootstrap_errors, image_df, rotate
from dipuq.maps.calibration import HeldoutPredictive, calibrate
from dipuq.operators.ray import RayTransform


def _blob(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, n)
    x[6:20, 9:15] = 1.0
    x[18:26, 16:27] += 0.5
    return x + 0.05 * torch.rand(n, n, generator=g)


def test_rotate_is_a_rotation_about_the_image_centre():
    x = _blob()
    quarter = rotate(x, math.pi / 2)  # pixel centres land on pixel centres: exact
    err = min(float((torch.rot90(x, k, (0, 1)) - quarter).abs().max()) for k in (1, -1))
    assert err < 1e-5
    x3 = torch.stack([x, 2 * x, 3 * x])  # (z, y, x): each z slice turns alike, z stays
    torch.testing.assert_close(rotate(x3, 0.4)[1], 2 * rotate(x, 0.4), rtol=1e-5, atol=1e-6)
    smooth = torch.as_tensor(np.exp(-((np.arange(32) - 15.5)[:, None] ** 2 + (np.arange(32) - 15.5) ** 2) / 40.0))
    back = rotate(rotate(smooth, 0.3), -0.3)
    assert float((back - smooth).abs().max()) < 0.02  # bilinear twice on a smooth bump
    with pytest.raises(DipuqError, match="2D or 3D"):
        rotate(torch.zeros(4), 0.1)


def test_bootstrap_sees_where_the_geometry_hides_content():
    x = torch.as_tensor(shepp_logan((32, 32)), dtype=torch.float32)

    def boot(n_angles, seed=0):
        g = Geometry.parallel2d(np.linspace(0, np.pi, n_angles, endpoint=False), (32, 32))
        A, A_H = RayTransform(g, backend="astra-cpu"), RayTransform(g.subset([0, 1]), backend="astra-cpu")
        return bootstrap_errors(A, A_H, x, sigma2=1e-6, lam=1e-3, n=6, tv_iter=150,
                                generator=torch.Generator().manual_seed(seed)), A_H, g

    sparse, A_H, g = boot(6)
    dense, _, _ = boot(60)
    # six views leave most of the content undetermined, sixty very little
    assert float(sparse.variance.mean()) > 3 * float(dense.variance.mean())  # measured 4.0×
    assert sparse.heldout_variance.shape == A_H.range_shape and sparse.errors.shape == (6, 32, 32)
    # the rotations are stratified over the circle; x ≥ 0 for this non-negative image
    assert all(k * 60 <= a < (k + 1) * 60 for k, a in enumerate(sparse.angles_deg)) and sparse.nonneg
    signed = bootstrap_errors(RayTransform(g, backend="astra-cpu"), None, x - 0.5,
                              sigma2=1e-6, lam=1e-3, n=2, tv_iter=5, generator=torch.Generator().manual_seed(0))
    assert not signed.nonneg and signed.heldout_variance is None
    again, _, _ = boot(6)
    torch.testing.assert_close(again.errors, sparse.errors)  # a fixed generator gives fixed replicates


def test_image_df_tells_gaussian_from_heavy_tailed_errors():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(64, 64, generator=g) + 0.5
    gauss = torch.randn(32, 64, 64, generator=g, dtype=torch.float64) * scale
    assert image_df(gauss, 1.0) > 20  # LOO-standardised Gaussians of 31 others: t_31
    sparse = gauss * (torch.rand(32, 64, 64, generator=g, dtype=torch.float64) < 0.1)  # errors at few voxels, rarely
    assert image_df(sparse, 1.0) < 4
    # a Gaussian floor (the posterior's own variance) that dwarfs the sparse term makes it Gaussian again
    assert image_df(sparse, 1.0, floor=100.0 * scale.double() ** 2) > 20


def test_calibration_weights_the_bootstrap_term_when_the_residuals_follow_it():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(4), 1500)
    pv = rng.uniform(0.01, 1.0, groups.size)
    bv = rng.uniform(0.01, 1.0, groups.size) ** 3  # a model-error shape unlike the posterior's
    r = rng.normal(0, np.sqrt(0.2 * pv + 2.0 * bv + 0.01))
    pred = HeldoutPredictive(r, pv, None, sigma2=0.01, groups=groups, boot_var=bv)
    model, report = calibrate(pred, tails="gaussian")
    assert report["model"] == "scale+boot/gaussian"
    assert model.boot_weight == pytest.approx(2.0, rel=0.2) and model.scale == pytest.approx(0.2, rel=0.3)
    assert report["candidates"]["scale+boot/gaussian"] > report["candidates"]["scale/gaussian"]
    # without the term's variance the boot models are not candidates
    _, rep = calibrate(HeldoutPredictive(r, pv, None, sigma2=0.01, groups=groups), tails="gaussian")
    assert not any("boot" in k for k in rep["candidates"])
