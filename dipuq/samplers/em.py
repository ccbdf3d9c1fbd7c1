"""Sample-based EM for the prior variance g (σ² fixed), with any sampler.

Each round solves the linear-model mean offset u (warm-started), draws K zero-mean posterior
samples z_k with the same chain seeds every round (warm-started), estimates the effective
dimension γ̂ = σ⁻² mean_k ||AJ̃z_k||² clamped to [1, m − 1] and sets g ← ||u||² / γ̂ (DESIGN.md §2).
:func:`iterate_em` is the generator of rounds, :func:`run_em` drives it with :func:`drive`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from dipuq.errors import DipuqError, DivergenceError
from dipuq.posterior.model import Posterior
from dipuq.samplers.base import MeanResult, SampleResult, Sampler, SamplerState, drive, resolve_seed

__all__ = ["EMState", "EMResult", "iterate_em", "run_em"]


@dataclass
class EMState:
    """One EM round: the g used, the mean offset norm ||u||², γ̂ (clamped) and the updated g."""

    round: int
    g: float
    u_norm2: float
    gamma: float
    g_new: float
    mean: MeanResult
    samples: SampleResult


@dataclass
class EMResult:
    posterior: Posterior  # with the final g
    g_trace: list[float]  # g before each round, then the final value
    gamma_trace: list[float]
    mean: MeanResult | None = None


def iterate_em(
    post: Posterior,
    sampler: Sampler,
    n_rounds: int = 10,
    n_samples: int = 16,
    seed: int = 0,
    rtol: float = 0.0,
    sample_fn: Callable[..., SampleResult] | None = None,
    sync: Callable[[float], float] | None = None,
    step_callback: Callable[[SamplerState], None] | None = None,
) -> Generator[EMState, None, Posterior]:
    """Sample-based EM for the prior variance g (σ² fixed), one :class:`EMState` per round.

    Each round solves the mean offset u (warm-started), draws ``n_samples`` zero-mean samples
    (same chain seeds every round, warm-started through ``sampler.rescale_warm``), sets
    γ̂ = σ⁻² mean_k ||AJ̃z_k||² clamped to [1, m − 1] and g ← ||u||² / γ̂, and warns when the
    sampler reports its samples unconverged (their misfit biases γ̂). Stops early when
    |Δg| / g < ``rtol``. Returns the posterior with the final g.

    Hooks for sharded runs (:func:`dipuq.samplers.distributed.em_hooks`): ``sample_fn(sampler, post,
    n_samples, seed, init[, callback])`` draws a round's samples (default ``sampler.sample(..., keep_warm=True)``;
    its ``gamma`` must cover all chains), and ``sync(g_new)`` returns the g every process adopts.
    ``step_callback`` sees every solver step of the mean solve and of the samples (progress inside
    a round: on the demos one round is minutes of solver iterations).
    """
    if n_rounds < 1 or n_samples < 1:
        raise DipuqError("EM needs n_rounds >= 1 and n_samples >= 1")
    mean_warm, sample_warm = None, None
    for k in range(n_rounds):
        mean = sampler.mean(post, init=mean_warm, callback=step_callback)
        if sample_fn is None:
            res = sampler.sample(post, n_samples, seed=seed, init=sample_warm, keep_warm=True, callback=step_callback)
        else:
            extra = {} if step_callback is None else {"callback": step_callback}
            res = sample_fn(sampler, post, n_samples, seed, sample_warm, **extra)
        why = sampler.unconverged(res)
        if why is not None:
            warnings.warn(f"EM round {k}: {why}", RuntimeWarning, stacklevel=2)
        gamma = min(max(res.gamma, 1.0), post.m - 1.0)
        u_norm2 = float(mean.u.double().pow(2).sum())
        g_new = u_norm2 / gamma
        if sync is not None:
            g_new = sync(g_new)
        if not (math.isfinite(g_new) and g_new > 0):
            raise DivergenceError(f"EM round {k}: g update gave {g_new} (||u||^2 = {u_norm2}, gamma = {gamma})")
        yield EMState(k, post.g, u_norm2, gamma, g_new, mean, res)
        sample_warm = sampler.rescale_warm(res.warm, post.g, g_new)
        mean_warm = mean.warm
        old = post.g
        post = post.with_g(g_new)
        if rtol > 0 and abs(g_new - old) < rtol * old:
            break
    return post


def run_em(
    post: Posterior,
    sampler: Sampler,
    n_rounds: int = 10,
    n_samples: int = 16,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    rtol: float = 0.0,
    callback: Callable[[EMState], None] | None = None,
    sample_fn: Callable[..., SampleResult] | None = None,
    sync: Callable[[float], float] | None = None,
) -> EMResult:
    """Driver for :func:`iterate_em`; returns the fitted posterior and the traces of g and γ̂."""
    seed = resolve_seed(seed, generator)
    out = EMResult(post, [post.g], [])

    def record(st: EMState) -> None:
        if callback is not None:
            callback(st)
        out.g_trace.append(st.g_new)
        out.gamma_trace.append(st.gamma)
        out.mean = st.mean

    out.posterior = drive(iterate_em(post, sampler, n_rounds, n_samples, seed, rtol, sample_fn=sample_fn, sync=sync),
                          record)
    return out
