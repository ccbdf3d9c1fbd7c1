"""Simulated scans ``y = A x + ε``: a phantom projected through the ray transform, plus noise.

:func:`simulate_scan` is the measurement model of a simulation: the line integrals of a known
volume (a phantom of :mod:`dipuq.data.phantoms`) through a :class:`~dipuq.operators.RayTransform`
(or any operator ``A``), with Gaussian or Poisson noise, returned as a :class:`~dipuq.data.Scan`
that keeps the volume as its reference.
"""

from __future__ import annotations

import numpy as np
import torch

from dipuq.data.scan import Scan
from dipuq.errors import DataError
from dipuq.geometry import Geometry
from dipuq.operators.ray import RayTransform

__all__ = ["simulate_scan", "NOISE_MODELS"]

NOISE_MODELS = ("gaussian", "poisson", None)


def simulate_scan(phantom, geometry: Geometry, *, backend: str = "auto", operator=None,
                  noise: str | None = "gaussian", noise_level: float = 0.05, photons: float = 1e4,
                  mu: float | None = None, max_attenuation: float = 2.0,
                  generator: torch.Generator | None = None, name: str = "simulated") -> Scan:
    """A simulated scan ``y = A x + ε`` of ``phantom`` with the phantom as reference.

    Noise models:

    - ``"gaussian"``: ``ε ~ N(0, σ²)`` with ``σ = noise_level · mean |A x|`` (5 % by default).
    - ``"poisson"``: photon counts ``N ~ Poisson(I0 exp(-μ A x))`` with ``I0 = photons`` per
      detector pixel, converted back to ``y = -log(max(N, 1) / I0) / μ`` (so ``y ≈ A x`` in
      phantom units). ``μ`` is the attenuation, per unit of voxel length (``geometry.voxel_size``
      units), of a phantom value of 1. Default: ``μ = max_attenuation / max(A x)``, i.e. the most
      attenuating ray keeps ``exp(-2) ≈ 13.5 %`` of its photons — typical of lab and medical CT;
      a fixed μ would make attenuation depend on the grid size. ``noise_std`` is the RMS of the
      per-ray standard deviations ``1 / (μ sqrt(I0 exp(-μ A x)))``.
    - ``None``: noise-free.

    Parameters
    ----------
    phantom : (y, x) or (z, y, x) array, shape ``geometry.vol_shape``
    geometry : the acquisition geometry
    backend : :class:`dipuq.operators.RayTransform` backend (ignored if ``operator`` is given)
    operator : a :class:`~dipuq.operators.LinearOperator` ``A`` to use instead
    generator : randomness for the noise (required unless ``noise`` is None)

    Example::

        >>> g = Geometry.parallel2d(np.linspace(0, np.pi, 60, endpoint=False), (64, 64))
        >>> scan = simulate_scan(shepp_logan((64, 64)), g, noise="poisson", photons=1e4,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> scan.save("/tmp/phantom.npz")
    """
    x = np.asarray(phantom, dtype=np.float32)
    if x.shape != tuple(geometry.vol_shape):
        raise DataError(f"phantom shape {x.shape} does not match the geometry's volume {geometry.vol_shape}")
    if noise not in NOISE_MODELS:
        raise DataError(f"unknown noise model {noise!r}: use 'gaussian', 'poisson' or None")
    if noise is not None and not isinstance(generator, torch.Generator):
        raise DataError("noisy simulation needs generator=torch.Generator() (seed it for reproducibility)")
    if operator is None:
        operator = RayTransform(geometry, backend=backend)
    if tuple(operator.domain_shape) != x.shape or tuple(operator.range_shape) != geometry.proj_shape:
        raise DataError(f"operator maps {tuple(operator.domain_shape)} -> {tuple(operator.range_shape)}, "
                        f"but the geometry needs {x.shape} -> {geometry.proj_shape}")
    dev = getattr(operator, "device", torch.device("cpu"))
    with torch.no_grad():
        y0 = operator(torch.as_tensor(x, device=dev, dtype=torch.float32)).double().cpu()  # shape: proj_shape
    meta: dict = {"simulated": True, "noise": noise, "backend": getattr(operator, "backend", None)}
    noise_std = None
    if noise == "gaussian":
        if not noise_level > 0:
            raise DataError(f"noise_level must be > 0, got {noise_level}")
        noise_std = float(noise_level * y0.abs().mean())
        eps = torch.randn(y0.shape, generator=generator, dtype=torch.float64)
        y = y0 + noise_std * eps
        meta["noise_level"] = noise_level
    elif noise == "poisson":
        if not photons > 0:
            raise DataError(f"photons must be > 0, got {photons}")
        ymax = float(y0.max())
        if ymax <= 0:
            raise DataError("the phantom projects to zero everywhere: nothing attenuates")
        if mu is not None and not mu > 0:
            raise DataError(f"mu must be > 0, got {mu}")
        mu_ = float(mu) if mu is not None else max_attenuation / ymax
        rate = photons * torch.exp(-mu_ * y0.clamp_min(0))  # expected photons per pixel
        counts = torch.poisson(rate, generator=generator)
        y = -torch.log(counts.clamp_min(1.0) / photons) / mu_
        noise_std = float(torch.sqrt(torch.mean(1.0 / rate)) / mu_)
        meta.update(photons=photons, mu=mu_, max_attenuation=mu_ * ymax,
                    zero_counts=int((counts == 0).sum()))
    else:
        y = y0
    return Scan(y.numpy().astype(np.float32), geometry, reference=x, noise_std=noise_std, name=name, meta=meta)
