"""The one σ² decision (dipuq.posterior.noise) and the Posterior that requires its answer."""

from types import SimpleNamespace

import pytest
import torch

from dipuq.errors import ConfigError, DipuqError
from dipuq.operators.base import MatrixOperator
from dipuq.posterior.linearise import LinearisedModel
from dipuq.posterior.model import Posterior
from dipuq.posterior.noise import decide_sigma2
from dipuq.run.config import PosteriorConfig


def _cfg(noise="auto", sigma2=0.0):
    return SimpleNamespace(noise=noise, sigma2=sigma2)


def test_order_config_then_scan_then_residual():
    norm = 3.0
    # the same float operations as the pipeline used before the decision moved here (bit-identical σ²)
    assert decide_sigma2(_cfg(sigma2=0.5), residual=0.1, noise_std=0.2, norm=norm) == (0.5 / norm**2, "config")
    assert decide_sigma2(_cfg(), residual=0.1, noise_std=0.2, norm=norm) == ((0.2 / norm) ** 2, "scan")
    assert decide_sigma2(_cfg("scan"), residual=0.1, noise_std=0.2, norm=norm) == ((0.2 / norm) ** 2, "scan")
    assert decide_sigma2(_cfg(), residual=0.1, noise_std=None, norm=norm) == (0.1, "residual")
    assert decide_sigma2(_cfg("residual"), residual=0.1, noise_std=0.2, norm=norm) == (0.1, "residual")
    assert decide_sigma2(PosteriorConfig(), residual=0.1) == (0.1, "residual")  # the defaults: auto, unset


def test_scan_source_without_a_scan_noise_level_is_refused():
    with pytest.raises(ConfigError, match="records no noise_std"):
        decide_sigma2(_cfg("scan"), residual=0.1, noise_std=None)
    with pytest.raises(ConfigError, match="posterior.noise"):
        decide_sigma2(_cfg("guess"), residual=0.1)


def test_posterior_requires_sigma2():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(2, 1, 1))
    A = MatrixOperator(torch.randn(20, 16, generator=torch.Generator().manual_seed(0)), (4, 4), (20,))
    model = LinearisedModel(net, torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1)), A)
    y = A(model.mean)
    with pytest.raises(TypeError):
        Posterior(model, A, y)  # no default: the caller decides σ²
    with pytest.raises(DipuqError, match="needs the noise variance"):
        Posterior(model, A, y, sigma2=None, scale=torch.ones(model.p))
    assert Posterior(model, A, y, sigma2=0.25, scale=torch.ones(model.p)).sigma2 == 0.25
