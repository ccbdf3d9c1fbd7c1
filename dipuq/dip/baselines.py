"""Baseline reconstructions (and uncertainty baselines) behind one interface.

Every baseline is a :class:`Baseline` subclass — a dataclass whose fields are its configuration —
with ``reconstruct(A, y, *, generator=None, x_input=None) -> BaselineResult``. They are chosen by
name with :func:`make_baseline` (registry :data:`BASELINES`):

============== ======================================================================
``"fbp"``       analytic reconstruction, FBP / FDK by beam (``dipuq.operators.recon.analytic``)
``"sirt"``      SIRT, ``n_iter`` iterations (``dipuq.operators.recon.sirt``)
``"cgls"``      CGLS on the normal equations, ``n_iter`` iterations (``recon.cgls``)
``"tv"``        TV-regularised least squares, solved by PDHG (Chambolle–Pock)
``"dip"``       the deep image prior (:func:`dipuq.dip.driver.run_dip`), no uncertainty
``"mcdo"``      DIP-MCDO: DIP with channel dropout, then K stochastic passes -> mean, std
``"fixed-sigma"`` DIP with a constant std map (see :class:`FixedSigmaDip`)
============== ======================================================================

Example::

    >>> from dipuq.operators import MatrixOperator
    >>> g = torch.Generator().manual_seed(0)
    >>> A = MatrixOperator(torch.randn(40, 64, generator=g), (8, 8), (40,))
    >>> y = A(torch.rand(8, 8, generator=g))
    >>> res = make_baseline("tv", lam=0.1, n_iter=300).reconstruct(A, y)
    >>> res.recon.shape, res.std
    (torch.Size([8, 8]), None)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dipuq.dip.driver import DipResult, run_dip
from dipuq.dip.fit import DipConfig, check_projections
from dipuq.dip.networks import NetworkConfig, UNet
from dipuq.dip.tv import choose_tv_weight, gradient, gradient_adjoint, tv_anisotropic, tv_pdhg
from dipuq.errors import ConfigError
from dipuq.operators import recon

__all__ = [
    "BaselineResult",
    "Baseline",
    "Analytic",
    "SIRT",
    "CGLS",
    "TVLeastSquares",
    "Dip",
    "DipMCDO",
    "FixedSigmaDip",
    "BASELINES",
    "make_baseline",
    "gradient",
    "gradient_adjoint",
    "tv_pdhg",
    "mc_dropout_moments",
    "noise_equivalent_std",
    "oracle_constant_std",
]


@dataclass
class BaselineResult:
    """A baseline's output: ``recon`` (``A.domain_shape``), optional ``std`` (same shape)."""

    name: str
    recon: torch.Tensor
    std: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)


class Baseline:
    """A reconstruction method x = R(A, y) (optionally with a per-voxel std)."""

    name: ClassVar[str] = ""

    def reconstruct(self, A, y: torch.Tensor, *, generator: torch.Generator | None = None,
                    x_input: torch.Tensor | None = None) -> BaselineResult:  # pragma: no cover
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


_validate = check_projections


# ----------------------------------------------------------------------------------------
# classical
# ----------------------------------------------------------------------------------------
@dataclass
class Analytic(Baseline):
    """Filtered back-projection (2D parallel/fan) or FDK (3D cone), via ``recon.analytic``."""

    name: ClassVar[str] = "fbp"

    def reconstruct(self, A, y, *, generator=None, x_input=None) -> BaselineResult:
        y = _validate(A, y)
        return BaselineResult(self.name, recon.analytic(A, y).reshape(A.domain_shape))


@dataclass
class _Iterative(Baseline):
    """A least-squares solver of ``recon`` (``solver``) run for ``n_iter`` iterations."""

    solver: ClassVar[Callable]
    n_iter: int = 1

    def __post_init__(self):
        _positive_int(self.n_iter, f"{self.name}.n_iter")

    def reconstruct(self, A, y, *, generator=None, x_input=None) -> BaselineResult:
        y = _validate(A, y)
        return BaselineResult(self.name, type(self).solver(A, y, self.n_iter).reshape(A.domain_shape))


@dataclass
class SIRT(_Iterative):
    """SIRT x ← x + C Aᵀ R (y − A x) for ``n_iter`` iterations, via ``recon.sirt``."""

    name: ClassVar[str] = "sirt"
    solver: ClassVar[Callable] = staticmethod(recon.sirt)
    n_iter: int = 100


@dataclass
class CGLS(_Iterative):
    """CGLS (conjugate gradients on AᵀA x = Aᵀy) for ``n_iter`` iterations, via ``recon.cgls``."""

    name: ClassVar[str] = "cgls"
    solver: ClassVar[Callable] = staticmethod(recon.cgls)
    n_iter: int = 20


def _positive_int(v, what):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {v!r}")


@dataclass
class TVLeastSquares(Baseline):
    """x = argmin (1/m)||Ax − y||² + λ TV(x) (x ≥ 0 when ``nonneg``), by :func:`tv_pdhg`.

    ``lam = "auto"``: λ is chosen by :func:`~dipuq.dip.tv.select_tv_weight` on about
    ``heldout`` of the angles held out (:func:`~dipuq.dip.tv.split_heldout`), then the chosen
    weight is solved on all angles, warm-started. The weight that matters moves over decades
    between scans (:mod:`dipuq.dip.tv`), so a fixed number is right for one scan at most.
    """

    name: ClassVar[str] = "tv"
    lam: float | str = "auto"
    n_iter: int = 500
    nonneg: bool = True
    heldout: float = 0.1

    def __post_init__(self):
        if self.lam != "auto" and (isinstance(self.lam, (str, bool)) or not self.lam >= 0):
            raise ConfigError(f"tv.lam must be 'auto' or a number >= 0, got {self.lam!r}")
        _positive_int(self.n_iter, "tv.n_iter")

    def reconstruct(self, A, y, *, generator=None, x_input=None) -> BaselineResult:
        y = _validate(A, y)
        if self.lam == "auto":
            sel = choose_tv_weight(A, y, fraction=self.heldout, n_iter=self.n_iter, nonneg=self.nonneg,
                                   generator=generator)
            lam, x, meta = sel.lam, sel.x, {"selection": sel.to_dict()}
        else:
            for state in tv_pdhg(A, y, self.lam, self.n_iter, nonneg=self.nonneg, generator=generator):
                pass
            lam, x, meta = self.lam, state.x, {}
        obj = float((A(x) - y).square().mean() + lam * tv_anisotropic(x, x.ndim))
        return BaselineResult(self.name, x, meta={"objective": obj, "lam": lam, **meta})


# ----------------------------------------------------------------------------------------
# DIP-based baselines
# ----------------------------------------------------------------------------------------
def _fit(cfg: DipConfig, A, y, generator, x_input) -> tuple[UNet, DipResult]:
    y = _validate(A, y)
    net = UNet.from_config(cfg.network, ndim=len(A.domain_shape), generator=generator)
    net = net.to(dtype=A.dtype, device=A.device)
    result = run_dip(net, A, y, cfg, x_input=x_input, generator=generator)
    return net, result


@dataclass
class Dip(Baseline):
    """The plain DIP reconstruction f(θ*; z) (no uncertainty)."""

    name: ClassVar[str] = "dip"
    config: DipConfig = field(default_factory=DipConfig)

    def reconstruct(self, A, y, *, generator=None, x_input=None) -> BaselineResult:
        _, res = _fit(self.config, A, y, generator, x_input)
        return BaselineResult(self.name, res.recon, meta={"dip": res})


def mc_dropout_moments(net: UNet, x_input: torch.Tensor, n_samples: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over ``n_samples`` stochastic passes f(θ, dropout mask; z).

    Streaming (Welford) moments — only two volumes are held. The std is the sample std
    (denominator K − 1). Returns tensors of shape ``x_input.shape[2:]`` (the volume).
    """
    _positive_int(n_samples, "mcdo.n_samples")
    if not net.has_dropout:
        raise ConfigError("MC dropout needs a network with dropout layers (network.dropout > 0)")
    mean = torch.zeros(x_input.shape[2:], dtype=x_input.dtype, device=x_input.device)
    m2 = torch.zeros_like(mean)
    net.eval()
    net.set_dropout(True, generator)
    try:
        with torch.no_grad():
            for k in range(1, n_samples + 1):
                s = net(x_input)[0, 0]
                delta = s - mean
                mean += delta / k
                m2 += delta * (s - mean)
    finally:
        net.set_dropout(False)
    std = (m2 / max(1, n_samples - 1)).sqrt()
    return mean, std


@dataclass
class DipMCDO(Baseline):
    """DIP-MCDO: fit the DIP with channel dropout (``config.network.dropout`` > 0, masks on during
    the fit), then K = ``n_samples`` stochastic passes give the mean (the reconstruction) and the
    per-voxel std."""

    name: ClassVar[str] = "mcdo"
    config: DipConfig = field(default_factory=lambda: DipConfig(network=NetworkConfig(dropout=0.1)))
    n_samples: int = 32

    def __post_init__(self):
        _positive_int(self.n_samples, "mcdo.n_samples")
        if self.config.network.dropout <= 0:
            raise ConfigError("mcdo needs config.network.dropout > 0")

    def reconstruct(self, A, y, *, generator=None, x_input=None) -> BaselineResult:
        net, res = _fit(self.config, A, y, generator, x_input)
        mean, std = mc_dropout_moments(net, res.net_input, self.n_samples, generator)
        return BaselineResult(self.name, mean, std, meta={"dip": res})


def noise_equivalent_std(A, sigma2: float, n_probes: int = 16,
                         generator: torch.Generator | None = None) -> float:
    """The constant image std c whose white perturbation δ ~ N(0, c² I) has E||Aδ||² = m σ².

    E||Aδ||² = c² ||A||_F², so c = σ √(m / ||A||_F²); ||A||_F² = E||Av||², v ~ N(0, I), is
    estimated with ``n_probes`` Gaussian probes (Hutchinson).
    """
    m = math.prod(A.range_shape)
    v = torch.randn((n_probes, *A.domain_shape), generator=generator, dtype=A.dtype, device="cpu").to(A.device)
    with torch.no_grad():
        fro2 = float(A(v).double().square().sum() / n_probes)
    return math.sqrt(sigma2 * m / fro2)


def oracle_constant_std(recon: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS error ||recon − reference|| / √d: the constant std that maximises the Gaussian
    test log-likelihood of the reference (an oracle — it uses the ground truth)."""
    return float((recon - reference).double().square().mean().sqrt())


@dataclass
class FixedSigmaDip(Baseline):
    """DIP with a constant std map, the homoscedastic uncertainty baseline.

    ``sigma = "noise"``: the noise-equivalent image std :func:`noise_equivalent_std` with the
    DIP's residual estimate σ² (``DipResult.residual_sigma2``) — the std of white image noise that would
    explain the measured data misfit. A float: that constant. For the oracle constant
    (RMS error against a reference) use :func:`oracle_constant_std` in the experiment.
    """

    name: ClassVar[str] = "fixed-sigma"
    config: DipConfig = field(default_factory=DipConfig)
    sigma: str | float = "noise"

    def __post_init__(self):
        if isinstance(self.sigma, str) and self.sigma != "noise":
            raise ConfigError(f"fixed-sigma.sigma must be 'noise' or a positive number, got {self.sigma!r}")
        if not isinstance(self.sigma, str) and not self.sigma > 0:
            raise ConfigError(f"fixed-sigma.sigma must be > 0, got {self.sigma!r}")

    def std_from(self, A, result: DipResult, generator: torch.Generator | None = None) -> float:
        if isinstance(self.sigma, str):
            return noise_equivalent_std(A, result.residual_sigma2, generator=generator)
        return float(self.sigma)

    def reconstruct(self, A, y, *, generator=None, x_input=None, result: DipResult | None = None) -> BaselineResult:
        if result is None:
            _, result = _fit(self.config, A, y, generator, x_input)
        c = self.std_from(A, result, generator)
        return BaselineResult(self.name, result.recon, torch.full_like(result.recon, c),
                              meta={"dip": result, "constant_std": c})


BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls for cls in (Analytic, SIRT, CGLS, TVLeastSquares, Dip, DipMCDO, FixedSigmaDip)
}
BASELINES["fdk"] = Analytic  # the analytic method is chosen by beam; both names are accepted


def make_baseline(name: str, **params) -> Baseline:
    """The baseline registered under ``name`` with its parameters (a ``config`` may be a dict)."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    cls = BASELINES[name]
    if isinstance(params.get("config"), dict):
        params["config"] = DipConfig.from_dict(params["config"])
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"unknown parameters {unknown} for baseline {name!r}; allowed: {sorted(allowed)}")
    return cls(**params)
