"""Posterior sampling sharded across processes (GPUs, nodes) with ``torch.distributed``.

Samples of the linearised posterior are independent: chain k's noise comes from
``chain_generator(seed, k)`` alone, so a run of K chains split over W ranks draws exactly the
same K samples as one process. Rank r solves the chains

    C_r = {k : k ≡ r (mod W)}                        (:func:`shard_chains`, round-robin)

and accumulates its own power sums S_q^(r) = Σ_{k∈C_r} x_k^q (q = 1, 2, 4, and the count n_r);
the run's moments are their sum over ranks, S_q = Σ_r S_q^(r), one float64 all-reduce
(:func:`allreduce_moments`). The EM effective dimension γ̂ = σ⁻² mean_k ||AJ̃z_k||² is reduced
the same way, so every rank sees the same γ̂ and (after :meth:`DistContext.broadcast_object`) the
same g. The projector and the network stay on one device per rank. The process group, its
collectives and their failure handling are :mod:`dipuq.samplers.ranks`.

Example (run under ``torchrun --nproc_per_node 2``, or plainly as one process)::

    >>> from dipuq.samplers.ranks import init_distributed                       # doctest: +SKIP
    >>> with init_distributed() as dctx:                                       # doctest: +SKIP
    ...     res = sample_distributed(sampler, post, 64, seed=0, ctx=dctx)
    ...     if dctx.is_main:
    ...         np.save("std.npy", res.moments.std().cpu().numpy())
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dipuq.errors import DipuqError
from dipuq.posterior.model import Posterior
from dipuq.samplers.base import SampleResult, Sampler, SamplerState
from dipuq.samplers.moments import Moments
from dipuq.samplers.ranks import DistContext, current_context

__all__ = [
    "shard_chains", "allreduce_moments", "reduce_gamma", "sample_distributed", "DistributedSampleResult", "em_hooks",
]


def shard_chains(chains: int | Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of the chains, round-robin: chains[rank], chains[rank + W], ….

    ``chains`` is a count n (chains 0..n−1) or an explicit list. The shards of ranks 0..W−1 are
    disjoint and cover every chain exactly once; sizes differ by at most one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DipuqError(f"rank {rank} is outside [0, world_size={world_size})")
    chains = list(range(chains)) if isinstance(chains, int) else list(chains)
    return chains[rank::world_size]


def allreduce_moments(moments: Moments, ctx: DistContext) -> Moments:
    """Sum the power sums S₁, S₂, S₄ and the count n of ``moments`` over ranks, in place (float64).

    Afterwards every rank holds the moments of the union of all ranks' samples. Call it once per
    set of *new* samples (reducing an accumulator twice counts each rank's samples W times).
    """
    if not ctx.is_distributed:
        return moments
    n = torch.tensor([float(moments.n)], dtype=torch.float64, device=moments.s1.device)
    for t in (moments.s1, moments.s2, moments.s4, n):
        if t is not None:
            ctx.all_reduce_(t)
    moments.n = int(round(float(n)))
    return moments


def reduce_gamma(data_fit: torch.Tensor, ctx: DistContext) -> float:
    """Effective dimension γ̂ = σ⁻² mean_k ||AJ̃z_k||² over all ranks' chains (unclamped).

    ``data_fit`` holds this rank's per-chain terms σ⁻²||AJ̃z_k||² (``SampleResult.data_fit``).
    """
    acc = torch.tensor([float(data_fit.double().sum()), float(data_fit.numel())], dtype=torch.float64)
    ctx.all_reduce_(acc)
    if acc[1] < 1:
        raise DipuqError("no samples on any rank: cannot estimate the effective dimension")
    return float(acc[0] / acc[1])


@dataclass
class DistributedSampleResult(SampleResult):
    """:class:`SampleResult` of a sharded run: ``moments`` and ``data_fit`` cover *all* chains.

    ``chains``/``data_fit`` are in the order of the requested chains (as one process would give);
    ``history``, ``steps``, ``z`` and ``warm`` are this rank's (its ``local_chains``);
    ``rank_seconds`` is every rank's sampling time (load balance).
    """

    local_chains: list[int] = field(default_factory=list)
    rank_seconds: list[float] = field(default_factory=list)


def sample_distributed(
    sampler: Sampler,
    post: Posterior,
    n_samples: int | None = None,
    seed: int = 0,
    ctx: DistContext | None = None,
    moments: Moments | None = None,
    callback: Callable[[SamplerState], None] | None = None,
    chains: Sequence[int] | None = None,
    init: torch.Tensor | None = None,
    keep_warm: bool = False,
    keep_z: bool = False,
) -> DistributedSampleResult:
    """Draw chains 0..n−1 (or ``chains``) sharded over ranks; return the all-reduced moments.

    Rank r solves :func:`shard_chains` (chains, r, W) with the run ``seed`` (chain k's noise is
    a function of (seed, k) only), streams them into a fresh accumulator, then all ranks sum
    their accumulators. The union of samples, hence the std map, equals a single-process run's
    up to floating-point rounding (float64 sums in another order, float32 batches of other chains).

    Parameters
    ----------
    moments : Moments, optional
        Accumulator (identical on every rank, e.g. resumed from a checkpoint) that the reduced
        moments of the new chains are merged into; default a fresh one.
    init : tensor, optional
        Warm starts for *this rank's* chains (``warm`` of a previous call with the same chains).
    callback : called with every :class:`SamplerState` of this rank (progress bars).

    If any rank's share raises, every rank raises :class:`DistributedError` naming it.
    """
    ctx = ctx or current_context()
    if chains is None:
        if n_samples is None or n_samples < 1:
            raise DipuqError(f"n_samples must be >= 1, got {n_samples}")
        chains = range(n_samples)
    chains = [int(k) for k in chains]
    if not chains or len(set(chains)) != len(chains):
        raise DipuqError(f"chains must be a non-empty list of distinct chain indices, got {len(chains)} "
                         f"with {len(chains) - len(set(chains))} repeated")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DipuqError(f"distributed sampling needs an explicit integer seed, got {seed!r}")
    mine = shard_chains(chains, ctx.rank, ctx.world_size)
    shape = post.model.image_shape
    local = (Moments(shape, device=post.model.device) if moments is None else
             Moments(moments.shape, zero_mean=moments.zero_mean, fourth=moments.fourth, device=moments.s1.device))
    res, error, t0 = None, None, time.perf_counter()
    try:
        if mine:
            res = sampler.sample(post, chains=mine, seed=seed, moments=local, init=init, keep_warm=keep_warm,
                                 keep_z=keep_z, callback=callback)
    except Exception as exc:  # noqa: BLE001 - reported to every rank by agree()
        error = exc
    seconds = time.perf_counter() - t0
    ctx.agree(error, f"sampling chains {chains[0]}..{chains[-1]}")
    allreduce_moments(local, ctx)
    # per-chain data-fit terms in request order: each chain lives on exactly one rank, so a sum
    # of zero-padded vectors is exact
    pos = {k: i for i, k in enumerate(chains)}
    fit = torch.zeros(len(chains), dtype=torch.float64)
    if res is not None:
        fit[[pos[k] for k in mine]] = res.data_fit.double().cpu()
    ctx.all_reduce_(fit)
    secs = [float(s) for s in ctx.all_gather_object(seconds)] if ctx.is_distributed else [seconds]
    if moments is not None:
        moments.merge(local)
        local = moments
    return DistributedSampleResult(
        moments=local, chains=chains, seed=seed, data_fit=fit,
        history=res.history if res else [], steps=res.steps if res else 0, seconds=seconds,
        z=res.z if res else None, warm=res.warm if res else None, local_chains=mine, rank_seconds=secs,
    )


def em_hooks(ctx: DistContext | None = None) -> dict[str, Callable]:
    """Keyword arguments that make :func:`dipuq.samplers.iterate_em` / ``run_em`` run sharded.

    ``sample_fn`` draws each EM round's chains with :func:`sample_distributed` (γ̂ from all
    chains, warm starts per rank); ``sync`` makes every rank adopt rank 0's g update, so all
    ranks hold bit-identical posteriors. Single process: an empty dict (plain EM).

    Example: ``iterate_em(post, sampler, 10, 16, seed=seed, **em_hooks(dctx))``.
    """
    ctx = ctx or current_context()
    if not ctx.is_distributed:
        return {}

    def sample_fn(sampler: Sampler, post: Posterior, n_samples: int, seed: int, init, callback=None) -> SampleResult:
        return sample_distributed(sampler, post, n_samples, seed=seed, ctx=ctx, init=init, keep_warm=True,
                                  callback=callback)

    def sync(g_new: float) -> float:
        return float(ctx.broadcast_object(float(g_new), src=0))

    return {"sample_fn": sample_fn, "sync": sync}
