"""Posterior samplers for the linearised DIP: ``sgd`` (sample-then-optimise), ``cg``, ``exact``.

Every sampler maps the same per-chain noise to the same posterior sample, up to solver error.
Chain k draws ξ ~ N(0, I_p), ζ ~ N(0, I_m) from its own generator seeded by (seed, k) and sets
w₀ = √g ξ, ε = σ ζ; its zero-mean posterior sample is

    z_k = argmin_z L(z),   L(z) = ½σ⁻² ||A J̃ z||² + ½g⁻¹ ||z − w_n||²,   w_n = w₀ + g σ⁻² J̃ᵀAᵀ ε
        = w₀ + g J̃ᵀAᵀ (K + σ² I)⁻¹ (ε − A J̃ w₀),   K = g A J̃ J̃ᵀ Aᵀ      (Matheron's rule)
        ~ N(0, H⁻¹),  H = σ⁻² J̃ᵀAᵀAJ̃ + g⁻¹ I,

and its image sample is J̃ z_k (add f(θ*) for a sample of the image itself). Because a chain's
noise depends only on (seed, k), any split of the chains (batches, ranks) gives the same union
of samples. The linear-model mean offset u = w̄ − w_c solves the same problem with w₀ = 0 and
ε = r (the data residual, ``Posterior.data_residual``). J̃, AJ̃, H and K + σ²I are the
posterior's operators ``post.J``, ``post.AJ``, ``post.H`` and ``post.kernel``.

* ``sgd`` (:mod:`~dipuq.samplers.sgd`) — preconditioned Nesterov descent on L, chains batched;
* ``cg`` (:mod:`~dipuq.samplers.cg`) — the dual system by Nyström-preconditioned CG;
* ``exact`` (:mod:`~dipuq.samplers.exact`) — dense Cholesky, the oracle for tiny problems.

Each sampler is a generator of :class:`SamplerState` (``solve``, ``iterate``) plus the shared
drivers (``sample``, ``mean``) that stream image samples into :class:`Moments`
(:mod:`~dipuq.samplers.base` states the protocol). :func:`iterate_em` / :func:`run_em` fit g by
sample-based EM (:mod:`~dipuq.samplers.em`); :mod:`~dipuq.samplers.distributed` shards chains
over processes.

Example::

    >>> sampler = make_sampler("sgd", SamplerConfig(n_steps=500))            # doctest: +SKIP
    >>> res = sampler.sample(post, 64, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> std = res.moments.std()                                               # doctest: +SKIP
"""

from __future__ import annotations

from dipuq.errors import ConfigError
from dipuq.samplers.base import (
    SAMPLER_RESIDUAL_WARN, MeanResult, SampleResult, Sampler, SamplerConfig, SamplerState, chain_generator, drive,
    prior_draws,
)
from dipuq.samplers.cg import CGSampler
from dipuq.samplers.em import EMResult, EMState, iterate_em, run_em
from dipuq.samplers.exact import ExactSampler
from dipuq.samplers.moments import Moments
from dipuq.samplers.nystrom import NystromSketch, nystrom
from dipuq.samplers.sgd import SGDSampler

__all__ = [
    "SamplerConfig", "SamplerState", "SampleResult", "MeanResult", "Sampler", "SGDSampler", "CGSampler",
    "ExactSampler", "make_sampler", "chain_generator", "EMState", "EMResult", "iterate_em", "run_em",
    "SAMPLERS", "prior_draws", "drive", "Moments", "NystromSketch", "nystrom", "SAMPLER_RESIDUAL_WARN",
]

#: every sampler class by its ``name``
SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (SGDSampler, CGSampler, ExactSampler)}


def make_sampler(name: str = "sgd", cfg: SamplerConfig | dict | None = None) -> Sampler:
    """The sampler registered under ``name`` ("sgd" | "cg" | "exact") with its config."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if isinstance(cfg, dict):
        cfg = SamplerConfig.from_dict(cfg)
    return SAMPLERS[name](cfg)
