"""The noise variance σ² of the posterior, decided in one place: :func:`decide_sigma2`.

The data model is y = A x + η, η ~ N(0, σ² I) (DESIGN §2). σ² comes from one of three sources,
tried in this order:

========== ==================================================================================
source     σ² (in fit units: the pipeline divides y by ``norm``, so variances by norm²)
========== ==================================================================================
config     ``posterior.sigma2 / norm²`` when ``posterior.sigma2 > 0`` (0 means unset)
scan       ``(noise_std / norm)²``, the scan's recorded noise level, when ``posterior.noise`` is
           ``"scan"`` or ``"auto"`` and the scan has one (``"scan"`` without one is an error)
residual   the DIP residual ||A f(θ*) − y||² / m (``DipResult.residual_sigma2``)
========== ==================================================================================

The DIP's discrepancy stop (``dip.stop = "discrepancy"``) runs before any posterior exists and
takes its own target, ``dip.sigma2`` (:class:`dipuq.dip.fit.DipConfig`); it is not decided here.

Example::

    >>> from types import SimpleNamespace
    >>> decide_sigma2(SimpleNamespace(noise="auto", sigma2=0.0), residual=0.02, noise_std=0.5, norm=2.0)
    (0.0625, 'scan')
    >>> decide_sigma2(SimpleNamespace(noise="residual", sigma2=0.0), residual=0.02, noise_std=0.1)
    (0.02, 'residual')
"""

from __future__ import annotations

from dipuq.errors import ConfigError

__all__ = ["NOISE_SOURCES", "decide_sigma2"]

#: The values of ``posterior.noise``.
NOISE_SOURCES = ("auto", "scan", "residual")


def decide_sigma2(cfg, *, residual: float, noise_std: float | None = None, norm: float = 1.0) -> tuple[float, str]:
    """The posterior's noise variance σ² in fit units and its source (module docstring).

    Parameters
    ----------
    cfg : the ``[posterior]`` config section (``dipuq.run.config.PosteriorConfig``), read for
        ``noise`` (one of :data:`NOISE_SOURCES`) and ``sigma2`` (a fixed σ² in the scan's units;
        0 = unset)
    residual : the DIP residual estimate ||A f(θ*) − y||² / m, in fit units
    noise_std : the scan's recorded noise standard deviation in the scan's units (None = unknown)
    norm : the data scale: fit units are the scan's units divided by ``norm``

    Returns ``(sigma2, source)`` with ``source`` one of ``"config"``, ``"scan"``, ``"residual"``.
    """
    if cfg.noise not in NOISE_SOURCES:
        raise ConfigError(f"posterior.noise must be one of {NOISE_SOURCES}, got {cfg.noise!r}")
    if cfg.sigma2 > 0:
        return cfg.sigma2 / norm**2, "config"
    if cfg.noise in ("auto", "scan") and noise_std:
        return (float(noise_std) / norm) ** 2, "scan"
    if cfg.noise == "scan":
        raise ConfigError("posterior.noise = 'scan' but the scan records no noise_std; use 'residual' or set posterior.sigma2")
    return float(residual), "residual"
