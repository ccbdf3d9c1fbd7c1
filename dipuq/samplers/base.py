"""The sampler protocol, its config and states, and the one driver of generators (:func:`drive`).

A sampler draws zero-mean posterior weight samples z_k ~ N(0, H⁻¹) chain by chain (see
:mod:`dipuq.samplers`). Chain k draws ξ ~ N(0, I_p), ζ ~ N(0, I_m) from its own generator
:func:`chain_generator` (seed, k) and sets w₀ = √g ξ, ε = σ ζ (:func:`chain_noise`); a sampler
class only solves for a batch of chains given their (w₀, ε). What every sampler shares —
batching chains, streaming image samples J̃z_k into :class:`~dipuq.samplers.moments.Moments`,
the linear-model mean — lives in :class:`Sampler`.

The protocol (what EM and the pipeline may rely on, never a sampler's class):

* ``name`` — the registry key ("sgd", "cg", "exact");
* ``keys`` — the :class:`SamplerConfig` fields the sampler reads (the driver reads
  ``Sampler.keys``);
* :meth:`Sampler.prepare`, :meth:`Sampler.solve` (a generator of :class:`SamplerState`),
  :meth:`Sampler.describe`;
* :meth:`Sampler.rescale_warm` — how a warm start carries over to another prior variance g;
* :meth:`Sampler.unconverged` — why a set of samples is not converged, or None.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TypeVar

import torch

from dipuq import memory, seeds
from dipuq.errors import ConfigError, DipuqError
from dipuq.posterior.model import Posterior
from dipuq.samplers.moments import Moments

__all__ = [
    "SAMPLER_RESIDUAL_WARN", "SamplerConfig", "SamplerState", "SampleResult", "MeanResult", "Sampler", "drive",
    "chain_generator", "chain_noise", "prior_draws", "resolve_seed", "sqnorm",
]

#: Above this final convergence measure a sampler's samples are reported as unconverged: for sgd
#: the error bound ||∇L||_{P⁻¹} / (σ⁻¹||AJ̃z||) (relative to the sample's own data fit), for cg
#: the final / initial residual norm. sgd starts each chain at its prior draw, so an unconverged
#: chain keeps part of the prior's variance and the std map comes out too large.
SAMPLER_RESIDUAL_WARN = 0.1

S = TypeVar("S")
R = TypeVar("R")


def drive(states: Generator[S, None, R], on_state: Callable[[S], None] | None = None) -> R:
    """Run a generator of states to its end, calling ``on_state`` with each; return its return value.

    The one driver of dipuq's algorithms (emcee's ``run_mcmc``): a solver yields states and
    returns its result; progress bars, logging and traces attach here, outside the algorithm.
    """
    while True:
        try:
            st = next(states)
        except StopIteration as stop:
            return stop.value
        if on_state is not None:
            on_state(st)


@dataclass
class SamplerConfig:
    """Options of all samplers (each reads its own: see each class's ``keys``).

    Common: ``chains_per_batch`` chains are solved together (one vmap'ed batch).
    sgd: ``n_steps`` (a cap), ``lr`` (None = ``lr_factor`` / λmax(P⁻¹H)), ``momentum`` (Nesterov;
    None = (√κ − 1)/(√κ + 1) with κ = λmax(P⁻¹H) / λmin(P⁻¹H) and λmin = 1, or 0.9 with a fixed lr),
    ``lr_decay`` ("none" | "cosine": step t uses lr·(f + (1 − f)·½(1 + cos(πt/n_steps))) with
    f = ``lr_final``, decaying from lr to lr_final × lr), ``average_from`` (Polyak averaging over
    the last fraction of steps; 0 = last iterate), ``power_iters``, ``grad_tol`` (stop a batch early
    when every chain's ||∇L||_{P⁻¹} / (σ⁻¹||AJ̃z||) — an upper bound on its error's energy norm
    ||z − z*||_H relative to the chain's own data fit — is below grad_tol; 0 = run all
    ``n_steps``; a chain's data fit, hence EM's γ̂, can be off by up to 2·grad_tol, and EM
    with warm starts compounds it: use ~1e-3 for sgd EM rounds), ``diverge_factor`` (raise
    :class:`~dipuq.errors.DivergenceError` once a chain's objective L is NaN/inf or exceeds
    diverge_factor × its value at the first step), ``precond_max_rank`` / ``precond_kappa`` /
    ``precond_memory_gb`` (grow the Nyström rank from ``precond_rank``, doubling, while the
    preconditioned condition number exceeds precond_kappa, within the rank and memory caps),
    ``precond_power_iters`` (subspace iterations in the Nyström sketch: each costs one more
    product per rank; 0 = the plain sketch. On the quick demo, rank 512 with one iteration
    needed 148 cg iterations against 221 without, for 512 more sketch products).
    cg: ``cg_tol`` (residual relative to the start, ||ε − AJ̃w₀||, which the prior sample's misfit
    dominates: a sample's data-fit error can reach cg_tol² × σ⁻²||AJ̃w₀||² — on the 24³ demo
    1e9 against a posterior sample's γ ≈ 7e3, so 1e-2 biased EM's γ̂ to m and g 6x low; ~1e-3
    is the floor of float32 J/A products there), ``cg_max_iter``, ``cg_block`` (solve a batch's
    chains in one Krylov space, block CG: 8–27 % fewer iterations than separate CG on the demo
    and the 2D benchmark, at the same cost per iteration; false = one CG per chain).
    sgd and cg: ``precond_rank`` of the Nyström preconditioner (0 = none; costs that many J̃ᵀAᵀAJ̃
    products once per posterior and a (p or m) × rank float64 matrix).
    exact: ``max_dense`` (largest m·p and d·p entries of the dense matrices).
    """

    chains_per_batch: int = 16
    n_steps: int = 1000
    lr: float | None = None
    lr_factor: float = 1.0
    momentum: float | None = None
    lr_decay: str = "none"
    lr_final: float = 0.1
    average_from: float = 0.0
    power_iters: int = 20
    grad_tol: float = 0.01
    diverge_factor: float = 1e4
    cg_tol: float = 1e-4
    cg_max_iter: int = 1000
    cg_block: bool = True
    precond_rank: int = 256
    precond_max_rank: int = 2048
    precond_kappa: float = 100.0
    precond_memory_gb: float = 2.0
    precond_power_iters: int = 0
    max_dense: float = 2e8

    def __post_init__(self):
        if self.chains_per_batch < 1 or self.n_steps < 1 or self.cg_max_iter < 1:
            raise ConfigError("sampler: chains_per_batch, n_steps and cg_max_iter must be >= 1")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ConfigError(f"sampler: momentum must be in [0, 1), got {self.momentum}")
        if self.lr_decay not in ("none", "cosine"):
            raise ConfigError(f"sampler: lr_decay must be 'none' or 'cosine', got {self.lr_decay!r}")
        if not 0 <= self.average_from < 1:
            raise ConfigError(f"sampler: average_from must be in [0, 1), got {self.average_from}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"sampler: lr must be positive, got {self.lr}")
        if not self.lr_factor > 0 or self.precond_rank < 0 or self.power_iters < 1:
            raise ConfigError("sampler: lr_factor > 0, precond_rank >= 0, power_iters >= 1 required")
        if self.precond_max_rank < 0 or not self.precond_kappa >= 1 or not self.precond_memory_gb > 0:
            raise ConfigError("sampler: precond_max_rank >= 0, precond_kappa >= 1 and precond_memory_gb > 0 required")
        if self.precond_power_iters < 0:
            raise ConfigError(f"sampler: precond_power_iters must be >= 0, got {self.precond_power_iters}")
        if not 0 <= self.grad_tol < 1:
            raise ConfigError(f"sampler: grad_tol must be in [0, 1), got {self.grad_tol}")

    @classmethod
    def from_dict(cls, d: dict) -> SamplerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"sampler: unknown option(s) {unknown}")
        return cls(**d)


@dataclass
class SamplerState:
    """One step of one batch of chains. ``z`` (b, p) is the current estimate (not a copy).

    On the last step of a batch ``done`` is True and ``samples`` holds the image samples J̃z
    ``(b, *image_shape)`` and ``data_fit`` σ⁻²||AJ̃z||² per chain (the EM effective-dimension terms).
    """

    sampler: str
    chains: list[int]
    step: int
    z: torch.Tensor
    objective: torch.Tensor | None = None  # shape: (b,)
    grad_norm: torch.Tensor | None = None  # shape: (b,), or the relative residual for cg
    done: bool = False
    samples: torch.Tensor | None = None
    data_fit: torch.Tensor | None = None
    warm: torch.Tensor | None = None  # what to pass back as ``init`` to warm-start this batch


@dataclass
class SampleResult:
    """Streaming output of :meth:`Sampler.sample`."""

    moments: Moments
    chains: list[int]
    seed: int
    data_fit: torch.Tensor  # σ⁻²||AJ̃z_k||² per chain, shape: (K,)
    history: list[dict] = field(default_factory=list)  # per batch: objective / grad_norm per step
    steps: int = 0  # solver iterations summed over batches
    seconds: float = 0.0
    z: torch.Tensor | None = None  # (K, p) weight samples when keep_z=True
    warm: torch.Tensor | None = None  # (K, ·) warm-start states when keep_warm=True

    @property
    def gamma(self) -> float:
        """Effective dimension estimate γ̂ = σ⁻² mean_k ||AJ̃ z_k||² (unclamped)."""
        return float(self.data_fit.mean())


@dataclass
class MeanResult:
    """Linear-model mean: u = w̄ − w_c (p,), w̄ (p,), image f(θ*) + J̃ w̄, and a warm start."""

    u: torch.Tensor
    w: torch.Tensor
    image: torch.Tensor
    warm: torch.Tensor
    history: dict = field(default_factory=dict)


def chain_generator(seed: int, chain: int, device=None) -> torch.Generator:
    """The generator of chain ``chain`` under run seed ``seed``: a pure function of (seed, chain)."""
    return seeds.generator(seed, int(chain), device=device)


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The run seed: ``seed`` itself, or one draw from a user's ``generator`` (the only place
    a torch.Generator becomes a seed; chains then derive their generators from it)."""
    if seed is not None:
        return int(seed)
    if generator is None:
        raise DipuqError("pass a torch.Generator (or an explicit seed) for sampling")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def chain_noise(post: Posterior, chains: Sequence[int], seed: int, noise: bool = True):
    """w₀ = √g ξ (b, p) and ε = σ ζ (b, *range_shape) for each chain, from its own generator
    (ξ is drawn first, so ``noise=False`` returns the same w₀ alone, without drawing ε)."""
    dev, dt = post.model.device, post.model.dtype
    xi, zeta = [], []
    for k in chains:
        gen = chain_generator(seed, k, dev)
        xi.append(torch.randn(post.p, generator=gen, device=dev, dtype=dt))
        if noise:
            zeta.append(torch.randn(post.A.range_shape, generator=gen, device=dev, dtype=dt))
    w0 = math.sqrt(post.g) * torch.stack(xi)
    return (w0, math.sqrt(post.sigma2) * torch.stack(zeta)) if noise else w0


def prior_draws(post: Posterior, chains: Sequence[int], seed: int) -> torch.Tensor:
    """The prior draws w₀ ~ N(0, g I) that chains ``chains`` of run ``seed`` start from, ``(b, p)``."""
    return chain_noise(post, chains, seed, noise=False)


def sqnorm(x: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row of a batch ``(b, …)`` in float64, shape ``(b,)``."""
    return x.reshape(x.shape[0], -1).double().pow(2).sum(1)


class Sampler:
    """Base class: draws zero-mean posterior weight samples z ~ N(0, H⁻¹) chain by chain.

    Subclasses set ``name`` and ``keys`` and implement :meth:`solve`, a generator that solves for
    one batch of chains given their (w₀, ε) and yields :class:`SamplerState`; its return value is
    ``(z, warm)``. The drivers :meth:`sample` and :meth:`mean` are shared.
    """

    name: str = ""
    #: the SamplerConfig fields this class reads (here: those of the shared driver)
    keys: tuple[str, ...] = ("chains_per_batch",)

    def __init__(self, cfg: SamplerConfig | None = None):
        self.cfg = cfg or SamplerConfig()

    # -- the protocol ----------------------------------------------------------------------------
    def solve(self, post: Posterior, w0: torch.Tensor, eps: torch.Tensor, chains: list[int],
              init: torch.Tensor | None = None) -> Generator[SamplerState, None, tuple]:
        """Solve for the chains ``chains`` with noise w₀ ``(b, p)``, ε ``(b, *range_shape)``;
        ``init`` is a warm start (the ``warm`` of an earlier solve). Returns ``(z, warm)``."""
        raise NotImplementedError  # pragma: no cover

    def prepare(self, post: Posterior) -> None:
        """Build what the solver needs (step size, preconditioner, dense matrices); cached on ``post``."""

    def describe(self, post: Posterior) -> dict:
        """Facts about the solver set-up for the run record (JSON-able)."""
        return {}

    def rescale_warm(self, warm: torch.Tensor | None, g_old: float, g_new: float) -> torch.Tensor | None:
        """The warm start for the same chains at prior variance ``g_new``, given ``warm`` at ``g_old``."""
        return warm

    def unconverged(self, res: SampleResult) -> str | None:
        """Why the samples of ``res`` are not converged (one sentence), or None when they are or
        the sampler has no per-sample error bound."""
        return None

    # -- generators of states ------------------------------------------------------------------
    def iterate(self, post: Posterior, chains: Sequence[int], seed: int,
                init: torch.Tensor | None = None) -> Iterator[SamplerState]:
        """Solve the given chains batch by batch, yielding every solver step.

        The last state of each batch has ``done=True``, the image samples and the data-fit terms.
        ``init`` (len(chains), ·) warm-starts each chain (see ``SampleResult.warm``).
        """
        chains = list(chains)
        self.prepare(post)
        b = self.cfg.chains_per_batch
        for i in range(0, len(chains), b):
            batch = chains[i : i + b]
            w0, eps = chain_noise(post, batch, seed)
            binit = None if init is None else init[i : i + b]
            z, warm = yield from self.solve(post, w0, eps, batch, binit)
            x = post.J(z)  # shape: (b, *image_shape)
            data_fit = sqnorm(post.A(x)) / post.sigma2
            yield SamplerState(self.name, batch, -1, z, done=True, samples=x, data_fit=data_fit, warm=warm)

    # -- drivers ---------------------------------------------------------------------------------
    def sample(
        self,
        post: Posterior,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        chains: Sequence[int] | None = None,
        moments: Moments | None = None,
        init: torch.Tensor | None = None,
        keep_z: bool = False,
        keep_warm: bool = False,
        callback: Callable[[SamplerState], None] | None = None,
    ) -> SampleResult:
        """Draw posterior samples and stream their image moments.

        Parameters
        ----------
        n_samples : int
            Number of chains 0..n−1 (or give ``chains`` explicitly, e.g. one rank's share).
        generator, seed
            The run seed is ``seed`` or drawn once from ``generator``; chain k uses (seed, k).
        moments : Moments, optional
            Accumulator to add to (default: a new zero-mean one).
        init, keep_warm
            Warm starts in, and the final solver states out (EM).
        callback : callable, optional
            Called with every :class:`SamplerState` (progress bars, logging).
        """
        if chains is None:
            if n_samples is None or n_samples < 1:
                raise DipuqError(f"n_samples must be >= 1, got {n_samples}")
            chains = range(n_samples)
        chains = list(chains)
        if post.model.device.type == "cpu":  # a vmap'ed batch holds ~8 copies of its chains' states
            memory.require(8.0 * len(chains) * (8.0 * post.p + 4.0 * (post.d + post.m)),
                           f"a batch of {len(chains)} chains", "lower sampler.chains_per_batch")
        seed = resolve_seed(seed, generator)
        if moments is None:
            moments = Moments(post.model.image_shape, device=post.model.device)
        t0 = time.perf_counter()
        fits, zs, warms, history, steps = [], [], [], [], 0
        obj, gn = [], []
        for st in self.iterate(post, chains, seed, init=init):
            if callback is not None:
                callback(st)
            if not st.done:
                steps += 1
                if st.objective is not None:
                    obj.append(float(st.objective.mean()))
                if st.grad_norm is not None:
                    gn.append(float(st.grad_norm.mean()))
                continue
            moments.update(st.samples)
            fits.append(st.data_fit)
            history.append({"chains": st.chains, "objective": obj, "grad_norm": gn})
            obj, gn = [], []
            if keep_z:
                zs.append(st.z.detach().clone())
            if keep_warm and st.warm is not None:
                warms.append(st.warm.detach().clone())
        return SampleResult(
            moments=moments, chains=chains, seed=seed, data_fit=torch.cat(fits).cpu(), history=history,
            steps=steps, seconds=time.perf_counter() - t0, z=torch.cat(zs) if keep_z else None,
            warm=torch.cat(warms) if keep_warm and warms else None,
        )

    def mean(self, post: Posterior, init: torch.Tensor | None = None,
             callback: Callable[[SamplerState], None] | None = None) -> MeanResult:
        """The linear-model posterior mean, u = argmin ½σ⁻²||AJ̃u − r||² + ½g⁻¹||u||², w̄ = w_c + u."""
        self.prepare(post)
        w0 = torch.zeros(1, post.p, dtype=post.model.dtype, device=post.model.device)
        r = post.data_residual.unsqueeze(0)
        obj, gn = [], []

        def record(st: SamplerState) -> None:
            if callback is not None:
                callback(st)
            if st.objective is not None:
                obj.append(float(st.objective[0]))
            if st.grad_norm is not None:
                gn.append(float(st.grad_norm[0]))

        u, warm = drive(self.solve(post, w0, r, [-1], None if init is None else init.unsqueeze(0)), record)
        u = u[0]
        w = post.w_center + u
        image = post.model.mean + post.J(w)
        return MeanResult(u=u, w=w, image=image, warm=warm[0], history={"objective": obj, "grad_norm": gn})
