"""Streaming moments equal batch moments; merge; MC standard error; UncertaintyMaps round trip."""

import math

import numpy as np
import pytest
import torch

from dipuq.errors import DipuqError
from dipuq.maps.uncertainty import UncertaintyMaps, normal_quantile
from dipuq.samplers.moments import Moments


def test_streaming_equals_batch_and_merge():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, 5, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 30).reshape(6, 5)
    mom = Moments((6, 5))
    for chunk in torch.split(x, 7):
        mom.update(chunk)
    # float64 sums in another order: equal to ~1e-15 relative
    torch.testing.assert_close(mom.variance(), x.pow(2).mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(mom.mean(), x.mean(0), rtol=1e-12, atol=1e-15)
    a, b = Moments((6, 5)).update(x[:20]), Moments((6, 5)).update(x[20:])
    torch.testing.assert_close(a.merge(b).variance(), mom.variance(), rtol=1e-12, atol=0)
    # non-zero-mean mode: the unbiased sample variance
    c = Moments((6, 5), zero_mean=False)
    for chunk in torch.split(x + 5.0, 11):
        c.update(chunk)
    torch.testing.assert_close(c.variance(), (x + 5.0).var(0), rtol=1e-9, atol=0)
    # state dict round trip
    back = Moments.from_state_dict(mom.state_dict())
    assert back.n == 50 and torch.equal(back.s4, mom.s4)


def test_std_standard_error_matches_spread_over_repeats():
    gen = torch.Generator().manual_seed(1)
    K, R = 40, 400
    x = torch.randn(R, K, 8, generator=gen, dtype=torch.float64) * 2.0
    stds = x.pow(2).mean(1).sqrt()  # R independent std estimates per voxel
    se = Moments((8,)).update(x[0]).std_se()
    # theory for Gaussians: se = σ/sqrt(2K) = 0.224; the spread over 400 repeats estimates it to
    # ±3.5 %, the single-run estimate from 40 samples to ±~25 % (fourth moment), so compare averages.
    assert float(stds.std(0).mean()) == pytest.approx(2.0 / math.sqrt(2 * K), rel=0.06)
    assert float(se.mean()) == pytest.approx(2.0 / math.sqrt(2 * K), rel=0.25)
    g = Moments((8,), fourth=False).update(x[0])
    torch.testing.assert_close(g.std_se(), g.std() / math.sqrt(2 * K))


def test_bad_samples_refused():
    mom = Moments((3,))
    with pytest.raises(DipuqError, match="do not match"):
        mom.update(torch.zeros(2, 4))
    with pytest.raises(DipuqError, match="non-finite"):
        mom.update(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(DipuqError, match="at least 1"):
        mom.std()


def test_uncertainty_maps(tmp_path):
    mean = np.zeros((4, 4))
    std = np.full((4, 4), 2.0)
    maps = UncertaintyMaps(mean, std, std_se=std / 10, n_samples=7, meta={"sampler": "sgd"})
    ref = np.full((4, 4), 1.0)
    assert np.allclose(maps.zscore(ref), 0.5)
    lo, hi = maps.interval(0.95)
    assert np.allclose(hi, 1.959964 * 2.0, rtol=1e-6) and np.allclose(lo, -hi)
    assert normal_quantile(0.975) == pytest.approx(1.959963985, rel=1e-9)
    back = UncertaintyMaps.load(maps.save(tmp_path / "m.npz"))
    assert np.array_equal(back.std, std) and np.array_equal(back.std_se, std / 10)
    assert back.n_samples == 7 and back.meta == {"sampler": "sgd"}
    with pytest.raises(DipuqError, match="level"):
        maps.interval(1.5)
    with pytest.raises(DipuqError, match="cannot read"):
        UncertaintyMaps.load(tmp_path / "missing.npz")
