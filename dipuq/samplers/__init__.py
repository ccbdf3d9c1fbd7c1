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
ε = r (the data residual, ``Posterior.data_residual``).

* ``sgd`` — primal gradient descent on L with Nesterov momentum, optional learning-rate decay and
  Polyak iterate averaging, chains batched through ``vmap``. The gradient is preconditioned by
  P⁻¹, P = σ⁻² UΛUᵀ + g⁻¹I with UΛUᵀ a rank-``precond_rank`` randomised Nyström approximation of
  J̃ᵀAᵀAJ̃ (without it the condition number g·λmax/σ² + 1 reached 1e5–1e6 on a 64² DIP and 300
  plain steps left the std map 4x too large; with rank 256 it fell to ≈ 50 and 150 steps reached
  the Monte Carlo floor). Step size lr = lr_factor / λ̂ with λ̂ the largest eigenvalue of P⁻¹H from
  a few power iterations, so no per-problem tuning is needed (Nesterov with momentum μ is stable
  for lr·λmax < 2(1+μ)/(1+2μ), 1.36 at μ = 0.9). Since UΛUᵀ ⪯ J̃ᵀAᵀAJ̃, P ⪯ H and the spectrum of
  P⁻¹H lies in [1, κ], κ ≈ 1 + gλ_{r+1}/σ² (≈ 1 on the captured subspace): the default momentum is
  then Nesterov's (√κ−1)/(√κ+1), O(√κ) steps instead of the O(κ/10) of a fixed 0.9 (on a tiny
  problem with κ = 4.7e4, 1000 steps reached the exact std with it and left it 2.6x the MC error
  with 0.9). The Nyström rank starts at ``precond_rank`` and doubles while κ > ``precond_kappa``
  (default 100, so ≈ 10·ln(1/tol) steps), within ``precond_max_rank`` and a memory cap: a fixed
  rank let κ reach 1e5 once EM raised g, and 300 steps left the demo's std map 20x too large.
  Batches stop early once ||∇L||_{P⁻¹} < ``grad_tol`` · σ⁻¹||AJ̃z||: since P ⪯ H,
  σ⁻²||AJ̃e||² ≤ ||e||²_H ≤ ||∇L||²_{P⁻¹} for the error e = z − z*, so the error's data fit is
  at most grad_tol² of the sample's (which averages γ), whatever the scale of the problem. A
  criterion relative to the start is not enough: a chain starts at a prior sample w₀ whose misfit
  σ⁻²||AJ̃w₀||² (1e9 on the demo) dwarfs a posterior sample's (γ ≈ 7e3).
  Chains start at w₀, where the error
  z* − w₀ = H⁻¹σ⁻²J̃ᵀAᵀ(ε − AJ̃w₀) lies in the row space of AJ̃.
* ``cg`` — the dual system (K + σ²I) α = ε − AJ̃w₀ by batched preconditioned CG with a randomised
  Nyström preconditioner of K (Frangella, Tropp & Udell 2023), its rank grown as for ``sgd``.
* ``exact`` — dense Cholesky of (K + σ²I) (m ≤ p) or of H (p < m): the oracle for tiny problems.

Each sampler is a generator of :class:`SamplerState` (``iterate``) plus a driver (``sample``,
``mean``) that streams image samples into :class:`~dipuq.maps.uncertainty.Moments`.
:func:`iterate_em` / :func:`run_em` fit g by sample-based EM.

Example::

    >>> sampler = make_sampler("sgd", SamplerConfig(n_steps=500))            # doctest: +SKIP
    >>> res = sampler.sample(post, 64, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> std = res.moments.std()                                               # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from dipuq import memory, seeds
from dipuq.errors import ConfigError, DipuqError, DivergenceError
from dipuq.posterior.model import Posterior
from dipuq.maps.uncertainty import Moments

__all__ = [
    "SamplerConfig", "SamplerState", "SampleResult", "MeanResult", "Sampler", "SGDSampler", "CGSampler",
    "ExactSampler", "make_sampler", "chain_generator", "EMState", "EMResult", "iterate_em", "run_em",
    "SAMPLERS", "prior_draws",
]


#: sgd samples whose final ||∇L||_{P⁻¹} / (σ⁻¹||AJ̃z||) exceeds this are reported as unconverged
SGD_CONVERGED = 0.1


@dataclass
class SamplerConfig:
    """Options of all samplers (each reads its own).

    Common: ``chains_per_batch`` chains are solved together (one vmap'ed batch).
    sgd: ``n_steps`` (a cap), ``lr`` (None = ``lr_factor`` / λmax(P⁻¹H)), ``momentum`` (Nesterov;
    None = (√κ − 1)/(√κ + 1) with κ = λmax(P⁻¹H) / λmin(P⁻¹H) and λmin = 1, or 0.9 with a fixed lr),
    ``lr_decay`` ("none" | "cosine" to ``lr_final`` × lr), ``average_from`` (Polyak averaging over
    the last fraction of steps; 0 = last iterate), ``power_iters``, ``grad_tol`` (stop a batch early
    when every chain's ||∇L||_{P⁻¹} / (σ⁻¹||AJ̃z||) — an upper bound on its error's energy norm
    ||z − z*||_H relative to the chain's own data fit — is below grad_tol; 0 = run all
    ``n_steps``; a chain's data fit, hence EM's γ̂, can be off by up to 2·grad_tol, and EM
    with warm starts compounds it: use ~1e-3 for sgd EM rounds), ``diverge_factor``, ``precond_max_rank`` / ``precond_kappa`` /
    ``precond_memory_gb`` (grow the Nyström rank from ``precond_rank``, doubling, while the
    preconditioned condition number exceeds precond_kappa, within the rank and memory caps).
    cg: ``cg_tol`` (residual relative to the start, ||ε − AJ̃w₀||, which the prior sample's misfit
    dominates: a sample's data-fit error can reach cg_tol² × σ⁻²||AJ̃w₀||² — on the 24³ demo
    1e9 against a posterior sample's γ ≈ 7e3, so 1e-2 biased EM's γ̂ to m and g 6x low; ~1e-3
    is the floor of float32 J/A products there), ``cg_max_iter``.
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
    precond_rank: int = 256
    precond_max_rank: int = 2048
    precond_kappa: float = 100.0
    precond_memory_gb: float = 2.0
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


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None:
        return int(seed)
    if generator is None:
        raise DipuqError("pass a torch.Generator (or an explicit seed) for sampling")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def _chain_noise(post: Posterior, chains: Sequence[int], seed: int, noise: bool = True):
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
    return _chain_noise(post, chains, seed, noise=False)


def _sqnorm(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double().pow(2).sum(1)


class NystromSketch:
    """Randomised Nyström approximation S ≈ U diag(Λ) Uᵀ of a PSD operator S on R^n, growable.

    Keeps the sketch Y = S Ω of an orthonormal test matrix Ω (n × r, float64): :meth:`extend`
    adds columns (orthogonal to the old ones) and applies S only to those, so growing the rank
    from r to 2r costs r more products, not 2r; :meth:`factor` forms U, Λ from the sketch with
    a stabilising shift (Frangella, Tropp & Udell 2023). Deterministic for a given ``seed``.
    Memory: 3 · n · r float64 numbers at rank r (Ω, Y and the factor).
    """

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor], n: int, device=None,
                 seed: int = 54321, batch: int = 32):
        self.matvec, self.n, self.batch, self.device = matvec, n, batch, device
        self.gen = torch.Generator(device=device or "cpu").manual_seed(seed)
        self.omega = torch.zeros(n, 0, dtype=torch.float64, device=device)
        self.Y = torch.zeros(n, 0, dtype=torch.float64, device=device)
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rank(self) -> int:
        return self.omega.shape[1]

    def extend(self, rank: int) -> None:
        """Grow the sketch to ``rank`` columns (no-op if it has that many)."""
        k = min(rank, self.n) - self.rank
        if k <= 0:
            return
        G = torch.randn(self.n, k, generator=self.gen, dtype=torch.float64, device=self.device)
        for _ in range(2 if self.rank else 0):  # twice is enough (Giraud et al. 2005)
            G -= self.omega @ (self.omega.T @ G)
        Q, _ = torch.linalg.qr(G)
        Y = torch.cat([self.matvec(Q[:, i : i + self.batch].T).double() for i in range(0, k, self.batch)]).T
        self.omega, self.Y = torch.cat([self.omega, Q], 1), torch.cat([self.Y, Y], 1)

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U ``(n, r)`` with orthonormal columns and Λ ``(r,)`` ≥ 0, descending (float64), cached per rank."""
        r = self.rank
        if r == 0:
            raise DipuqError("Nyström sketch is empty: extend it first")
        if r not in self._factors:
            omega, Y = self.omega, self.Y
            nu = float(torch.finfo(torch.float32).eps) * float(torch.linalg.matrix_norm(Y, ord=2)) * math.sqrt(self.n)
            Y_nu = Y + nu * omega
            C = omega.T @ Y_nu
            C = 0.5 * (C + C.T)
            L, info = torch.linalg.cholesky_ex(C)
            if info != 0:  # add jitter until positive definite
                eye = torch.eye(r, dtype=C.dtype, device=C.device)
                L = torch.linalg.cholesky(C + 1e-6 * torch.trace(C) / r * eye)
            B = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T  # Y_nu L⁻ᵀ, shape: (n, r)
            U, S, _ = torch.linalg.svd(B, full_matrices=False)
            self._factors = {r: (U, (S * S - nu).clamp(min=0))}  # keep only the newest factor
        return self._factors[r]


def nystrom(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, rank: int, device=None,
            seed: int = 54321, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` randomised Nyström approximation U diag(Λ) Uᵀ of a PSD operator on R^n.

    ``matvec`` maps ``(k, n)`` -> ``(k, n)``. Returns U ``(n, r)`` and Λ ``(r,)`` (float64), from r
    products with a Gaussian test matrix (see :class:`NystromSketch`).
    """
    sketch = NystromSketch(matvec, n, device=device, seed=seed, batch=batch)
    sketch.extend(rank)
    return sketch.factor()


def _lowrank_inverse(U: torch.Tensor, inside: torch.Tensor, outside: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ outside·(I − UUᵀ) v + U diag(inside) Uᵀ v, the form of both Nyström preconditioners.

    Applied in float64 and in this form (not outside·v + U diag(inside − outside) Uᵀ v): on the
    captured subspace the sgd preconditioner is ~σ²/λ₁ (1e-11 relative to g on the demo), below
    the float32 rounding of the difference. ``v`` is ``(b, …)``; the result has its shape and dtype.
    """
    def apply(v):
        vf = v.reshape(v.shape[0], -1).double()
        c = vf @ U  # shape: (b, r)
        return (outside * (vf - c @ U.T) + (c * inside) @ U.T).reshape(v.shape).to(v.dtype)

    return apply


class Sampler:
    """Base class: draws zero-mean posterior weight samples z ~ N(0, H⁻¹) chain by chain.

    Subclasses implement :meth:`solve`, a generator that solves for one batch of chains given
    their (w₀, ε) and yields :class:`SamplerState`; its return value is ``(z, warm)``.
    """

    key: str = ""

    def __init__(self, cfg: SamplerConfig | None = None):
        self.cfg = cfg or SamplerConfig()

    # -- to implement -----------------------------------------------------------------------
    def solve(self, post: Posterior, w0: torch.Tensor, eps: torch.Tensor, chains: list[int],
              init: torch.Tensor | None = None) -> Generator[SamplerState, None, tuple]:
        raise NotImplementedError  # pragma: no cover

    def prepare(self, post: Posterior) -> None:
        """Build what the solver needs (step size, preconditioner, dense matrices); cached on ``post``."""

    def describe(self, post: Posterior) -> dict:
        """Facts about the solver set-up for the run record (JSON-able)."""
        return {}

    def _grown_nystrom(self, post: Posterior, name: str, n: int, matvec: Callable[[torch.Tensor], torch.Tensor],
                       kappa_fn: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Nyström factor (U, Λ) of a g-independent PSD operator on R^n with spectrum that of J̃ᵀAᵀAJ̃.

        Starts at rank ``precond_rank`` and doubles it (up to ``precond_max_rank``, min(m, p) and
        ``precond_memory_gb``) while the condition number the preconditioned solver is left with,
        ``kappa_fn(U, Λ)`` (default the tail estimate 1 + g·λ_r/σ²), exceeds ``precond_kappa``.
        The rank settled for a (g, σ²) is cached. The operator does not depend on g or σ², so
        one growable sketch (cached on ``post`` under ``name``) serves every EM round; only its
        rank may grow when g does. None when ``precond_rank`` = 0.
        """
        cfg = self.cfg
        r0 = min(cfg.precond_rank, post.m, post.p)
        if r0 == 0:
            return None
        cap = max(int(cfg.precond_memory_gb * 2**30 / (24 * n)), 1)  # Ω, Y and U in float64
        if post.model.device.type == "cpu":
            memory.require(24.0 * n * r0, f"the rank-{r0} Nyström sketch on R^{n}",
                           "lower sampler.precond_rank (0 = no preconditioner) or the problem size")
            avail = memory.available_bytes()
            if avail is not None:  # never grow the sketch past half of what is free now
                cap = max(min(cap, int(0.5 * avail / (24 * n))), r0)
        r_max = min(max(cfg.precond_max_rank, r0), post.m, post.p, cap)
        sketch = post.cache.get(name)
        if sketch is None:
            sketch = NystromSketch(matvec, n, device=post.model.device)
            post.cache[name] = sketch
        settled = (name, "settled", post.g, post.sigma2)
        if settled in post.cache and sketch.rank:
            return sketch.factor()
        r = min(max(sketch.rank, r0), r_max)
        while True:
            sketch.extend(r)
            U, lam = sketch.factor()
            kappa = kappa_fn(U, lam) if kappa_fn is not None else 1.0 + post.g * float(lam[-1]) / post.sigma2
            if kappa <= cfg.precond_kappa or sketch.rank >= r_max:
                post.cache[settled] = kappa
                return U, lam
            r = min(2 * sketch.rank, r_max)

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
            w0, eps = _chain_noise(post, batch, seed)
            binit = None if init is None else init[i : i + b]
            z, warm = yield from self.solve(post, w0, eps, batch, binit)
            x = post.J(z)  # shape: (b, *image_shape)
            data_fit = _sqnorm(post.A(x)) / post.sigma2
            post.n_A += len(batch)
            yield SamplerState(self.key, batch, -1, z, done=True, samples=x, data_fit=data_fit, warm=warm)

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
        seed = _resolve_seed(seed, generator)
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
        gen = self.solve(post, w0, r, [-1], None if init is None else init.unsqueeze(0))
        obj, gn = [], []
        while True:
            try:
                st = next(gen)
            except StopIteration as stop:
                u, warm = stop.value
                break
            if callback is not None:
                callback(st)
            if st.objective is not None:
                obj.append(float(st.objective[0]))
            if st.grad_norm is not None:
                gn.append(float(st.grad_norm[0]))
        u = u[0]
        w = post.w_center + u
        image = post.model.mean + post.J(w)
        return MeanResult(u=u, w=w, image=image, warm=warm[0], history={"objective": obj, "grad_norm": gn})


# --------------------------------------------------------------------------------------------
class SGDSampler(Sampler):
    """Sample-then-optimise by Nesterov gradient descent on L(z) (see module docstring)."""

    key = "sgd"

    def precond_factor(self, post: Posterior) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Nyström approximation U diag(Λ) Uᵀ of M = J̃ᵀAᵀAJ̃ (p × p), float64; None if
        ``precond_rank`` = 0. The rank grows (:meth:`Sampler._grown_nystrom`) until the measured
        κ = λmax(P⁻¹H) is at most ``precond_kappa``: the tail estimate 1 + gλ_r/σ² is far too
        optimistic for sgd (21 where power iteration found 5180 on the 24³ demo, rank 2048),
        because the Nyström error is of the size of λ_{r/4}, not λ_r, when the spectrum decays slowly.
        """
        def M(V):  # (k, p) -> (k, p)
            return post.JTAT(post.AJ(V.to(post.model.dtype)))

        return self._grown_nystrom(post, "nystrom_primal_sketch", post.p, M,
                                   kappa_fn=lambda U, lam: self._lambda_max_for(post, (U, lam)))

    def describe(self, post: Posterior) -> dict:
        """Solver facts for the run record: preconditioner rank, κ estimate, step size, momentum."""
        fac = self.precond_factor(post)
        out = {"precond_rank": 0 if fac is None else int(fac[1].numel()),
               "step_size": self.step_size(post), "momentum": self.momentum(post)}
        if fac is not None:
            out["kappa_tail"] = 1.0 + post.g * float(fac[1][-1]) / post.sigma2  # 1 + gλ_r/σ²
        if self.cfg.lr is None:
            out["kappa"] = self.lambda_max(post)  # λmax(P⁻¹H), λmin ≥ 1
        return out

    def preconditioner(self, post: Posterior) -> Callable[[torch.Tensor], torch.Tensor]:
        """v ↦ P⁻¹ v with P = σ⁻² U Λ Uᵀ + g⁻¹ I (identity when precond_rank = 0)."""
        return self._pinv(post, self.precond_factor(post))

    @staticmethod
    def _pinv(post: Posterior, fac) -> Callable[[torch.Tensor], torch.Tensor]:
        if fac is None:
            return lambda v: v
        U, lam = fac
        # P⁻¹ = g (I − UUᵀ) + U diag(1/(σ⁻²Λ + g⁻¹)) Uᵀ
        return _lowrank_inverse(U, 1.0 / (lam / post.sigma2 + 1.0 / post.g), post.g)

    def _lambda_max_for(self, post: Posterior, fac) -> float:
        """Largest eigenvalue of P⁻¹H for the factor ``fac`` by power iteration, cached per (rank, g, σ²)."""
        key = ("lambda_max", self.cfg.power_iters, 0 if fac is None else fac[1].numel(), post.g, post.sigma2)
        if key not in post.cache:
            Pinv = self._pinv(post, fac)
            gen = torch.Generator(device=post.model.device).manual_seed(12345)
            v = torch.randn(4, post.p, generator=gen, dtype=torch.float64, device=post.model.device)
            v = v / v.norm(dim=1, keepdim=True)
            lam = torch.zeros(4)
            for _ in range(self.cfg.power_iters):  # float64 but the J/A products, as in solve
                Hv = Pinv(post.JTAT(post.AJ(v.to(post.model.dtype))).double() / post.sigma2 + v / post.g)
                lam = (v * Hv).sum(1) / (v * v).sum(1)
                v = Hv / Hv.norm(dim=1, keepdim=True).clamp(min=1e-30)
            lam_max = float(lam.max())
            if not math.isfinite(lam_max) or lam_max <= 0:
                raise DivergenceError("power iteration for the sgd step size gave NaN/inf: J or A is not finite")
            post.cache[key] = lam_max
        return post.cache[key]

    def lambda_max(self, post: Posterior) -> float:
        """Largest eigenvalue of P⁻¹H (H = σ⁻²M + g⁻¹I) by power iteration, cached per (g, σ²)."""
        return self._lambda_max_for(post, self.precond_factor(post))

    def prepare(self, post: Posterior) -> None:
        self.precond_factor(post)
        if self.cfg.lr is None:
            self.lambda_max(post)

    def step_size(self, post: Posterior) -> float:
        return self.cfg.lr if self.cfg.lr is not None else self.cfg.lr_factor / self.lambda_max(post)

    def momentum(self, post: Posterior) -> float:
        """Nesterov momentum: ``cfg.momentum``, or (√κ − 1)/(√κ + 1) for κ = λmax(P⁻¹H).

        P ⪯ H (the Nyström factor satisfies UΛUᵀ ⪯ M), so λmin(P⁻¹H) ≥ 1 and κ = λmax is the
        condition number: the momentum of Nesterov's method for strongly convex quadratics, which
        needs O(√κ) steps instead of the O(κ) of a fixed momentum 0.9 when κ ≫ 10.
        """
        if self.cfg.momentum is not None:
            return self.cfg.momentum
        if self.cfg.lr is not None or min(self.cfg.precond_rank, post.m, post.p) == 0:
            # without a preconditioner the error lies in the row space of AJ̃, where λmin(H/g⁻¹)
            # is unknown (often ≫ 1): κ = λmax would overestimate and slow convergence (measured)
            return 0.9
        kappa = max(self.lambda_max(post) / self.cfg.lr_factor, 1.0)
        return (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)

    def solve(self, post, w0, eps, chains, init=None):
        cfg = self.cfg
        g, s2, mu = post.g, post.sigma2, self.momentum(post)
        dt = post.model.dtype
        # iterates in float64 (p-sized, cheap); only the J/A products run in the model dtype
        w0 = w0.double()
        w_n = w0 + (g / s2) * post.JTAT(eps).double()  # shape: (b, p)
        z = (w0 if init is None else init.double()).clone()
        vel = torch.zeros_like(z)
        lr = self.step_size(post)
        fac = self.precond_factor(post)
        Pinv, has_pc = self._pinv(post, fac), fac is not None
        T = cfg.n_steps
        t_avg = T - int(round(cfg.average_from * T)) if cfg.average_from > 0 else T
        z_avg, n_avg = None, 0
        obj0 = None
        stopping = cfg.grad_tol > 0 and cfg.average_from == 0
        active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        for t in range(T):
            if cfg.lr_decay == "cosine":
                lr_t = lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t / T)))
            else:
                lr_t = lr
            zl = z + mu * vel  # Nesterov look-ahead
            r = post.AJ(zl.to(dt))  # shape: (b, *range_shape)
            dz = zl - w_n
            grad = post.JTAT(r).double() / s2 + dz / g
            objective = 0.5 * _sqnorm(r) / s2 + 0.5 * _sqnorm(dz) / g  # L at the look-ahead point
            pgrad = Pinv(grad)
            # ||∇L||²_{P⁻¹} = eᵀHP⁻¹He ≥ eᵀHe ≥ σ⁻²||AJ̃e||² for the error e = z − z* (P ⪯ H; P = g⁻¹I
            # without a preconditioner): relative to the chain's own misfit σ⁻²||AJ̃z||² it bounds
            # the error's share of the data fit (γ̂ for EM) and of the image sample
            fit = _sqnorm(r) / s2
            gnorm = ((grad * (pgrad if has_pc else g * grad)).sum(1).clamp(min=0) / fit.clamp(min=1e-30)).sqrt()
            if obj0 is None:
                obj0 = objective.clamp(min=1e-30)
            if not torch.isfinite(objective).all() or (objective > cfg.diverge_factor * obj0).any():
                ratio = float((objective / obj0).max())
                raise DivergenceError(
                    f"sgd sampler diverged at step {t}: objective grew {ratio:.3g}x (NaN/inf or > "
                    f"{cfg.diverge_factor:g}x its start); lower SamplerConfig.lr_factor (now {cfg.lr_factor:g}) "
                    f"or set a smaller lr (now {lr:.3g})"
                )
            if stopping:  # a chain that meets the tolerance stays at the verified point zl: its
                # result does not depend on which other chains share its batch (or rank)
                done = active & (gnorm < cfg.grad_tol)
                z = torch.where(done[:, None], zl, z)
                active = active & ~done
                vel = torch.where(active[:, None], mu * vel - lr_t * pgrad, torch.zeros_like(vel))
            else:
                vel = mu * vel - lr_t * pgrad
            z = z + vel
            if t >= t_avg:
                n_avg += 1
                z_avg = z.clone() if z_avg is None else z_avg + (z - z_avg) / n_avg
            yield SamplerState(self.key, chains, t, z if z_avg is None else z_avg, objective, gnorm)
            if stopping and not bool(active.any()):
                break
        out = (z if z_avg is None else z_avg).to(dt)
        return out, out


# --------------------------------------------------------------------------------------------
class CGSampler(Sampler):
    """Matheron's rule with the dual system (K + σ²I) α = ε − AJ̃w₀ solved by Nyström-PCG."""

    key = "cg"

    def nystrom(self, post: Posterior) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Randomised Nyström approximation K₁ ≈ U diag(Λ) Uᵀ of K₁ = AJ̃J̃ᵀAᵀ (g = 1), cached.

        U (m, r), Λ (r,) in float64; K = g K₁, so one sketch serves every g (EM); the rank is
        chosen adaptively (:meth:`Sampler._grown_nystrom`).
        """
        shape = post.A.range_shape

        def K1(V):  # (k, m) -> (k, m)
            return post.AJ(post.JTAT(V.to(post.model.dtype).reshape(-1, *shape))).reshape(V.shape[0], -1)

        return self._grown_nystrom(post, "nystrom_dual_sketch", post.m, K1)

    def describe(self, post: Posterior) -> dict:
        ny = self.nystrom(post)
        out = {"precond_rank": 0 if ny is None else int(ny[1].numel())}
        if ny is not None:
            out["kappa_tail"] = 1.0 + post.g * float(ny[1][-1]) / post.sigma2
        return out

    def prepare(self, post: Posterior) -> None:
        self.nystrom(post)

    def _precond(self, post: Posterior):
        ny = self.nystrom(post)
        if ny is None:
            return lambda v: v
        U, lam = ny
        lam_g = post.g * lam
        s2 = post.sigma2
        # P⁻¹ = (I − UUᵀ) + U diag((λ_r + σ²)/(λ + σ²)) Uᵀ
        return _lowrank_inverse(U, (lam_g[-1] + s2) / (lam_g + s2), 1.0)

    def solve(self, post, w0, eps, chains, init=None):
        # The CG vectors live in float64 (they are measurement-sized, cheap): in float32 the
        # recurrences lose orthogonality on ill-conditioned K + σ²I (large g early in EM) and
        # rᵀz underflows, which made β overflow to inf. Only the K products run in the model dtype.
        cfg = self.cfg
        bsz = w0.shape[0]
        rhs = (eps - post.AJ(w0)).double()  # shape: (b, *range_shape)
        Pinv = self._precond(post)
        dt = post.model.dtype

        def K(v):
            return post.kernel_matvec(v.to(dt)).double()

        def dot(a, b):
            return (a.reshape(bsz, -1) * b.reshape(bsz, -1)).sum(1)

        bnorm = dot(rhs, rhs).sqrt().clamp(min=1e-30)
        if init is None:
            alpha = torch.zeros_like(rhs)
            res = rhs.clone()
        else:
            alpha = init.to(rhs).reshape(rhs.shape).clone()
            res = rhs - K(alpha)
        zr = Pinv(res)
        pdir = zr.clone()
        rz = dot(res, zr)
        shape = (bsz,) + (1,) * (rhs.ndim - 1)
        for it in range(cfg.cg_max_iter):
            rel = dot(res, res).sqrt() / bnorm
            if not torch.isfinite(rel).all():
                raise DivergenceError(f"cg sampler produced NaN/inf at iteration {it}: check J, A and sigma2")
            active = (rel > cfg.cg_tol) & (rz > 0)  # rᵀP⁻¹r = 0: the chain is solved to round-off
            yield SamplerState(self.key, chains, it, alpha.to(dt), None, rel)
            if not bool(active.any()):
                break
            Kp = K(pdir)
            pKp = dot(pdir, Kp)
            a = torch.where(active & (pKp > 0), rz / pKp.clamp(min=1e-30), torch.zeros_like(rz))
            alpha = alpha + a.reshape(shape) * pdir
            res = res - a.reshape(shape) * Kp
            zr = Pinv(res)
            rz_new = dot(res, zr)
            beta = torch.where(active & (rz > 0), rz_new / rz.clamp(min=1e-300), torch.zeros_like(rz))
            pdir = zr + beta.reshape(shape) * pdir
            rz = rz_new
        alpha = alpha.to(dt)
        z = w0 + post.g * post.JTAT(alpha)
        return z, alpha.reshape(bsz, -1)


# --------------------------------------------------------------------------------------------
class ExactSampler(Sampler):
    """Dense Cholesky oracle (float64). Refuses problems with more than ``max_dense`` matrix entries."""

    key = "exact"

    def dense(self, post: Posterior) -> tuple[torch.Tensor, torch.Tensor]:
        """(J̃ (d, p), A J̃ (m, p)) in float64, cached on ``post``."""
        if "dense" not in post.cache:
            big = max(post.m, post.d) * post.p
            if big <= self.cfg.max_dense:
                memory.require(8.0 * (post.d + post.m) * post.p + 8.0 * min(post.m, post.p) ** 2,
                               f"the exact sampler's dense ({post.d} + {post.m}) x {post.p} matrices",
                               "lower sampler.max_dense, or use sampler 'sgd' or 'cg'")
            if big > self.cfg.max_dense:
                raise DipuqError(
                    f"exact sampler needs dense ({max(post.m, post.d)} x {post.p}) matrices "
                    f"({big:.3g} entries > max_dense {self.cfg.max_dense:.3g}): use sampler 'sgd' or 'cg'"
                )
            Jt = post.dense_J(torch.float64)
            post.cache["dense"] = (Jt, post.dense_AJ(torch.float64, J_tilde=Jt))
        return post.cache["dense"]

    def prepare(self, post: Posterior) -> None:
        self.dense(post)

    def _factor(self, post: Posterior):
        _, B = self.dense(post)
        key = ("chol", post.g, post.sigma2)
        if key not in post.cache:
            for k in [k for k in post.cache if isinstance(k, tuple) and k[0] == "chol"]:
                del post.cache[k]
            if post.m <= post.p:
                S = post.g * B @ B.T + post.sigma2 * torch.eye(post.m, dtype=B.dtype, device=B.device)
            else:
                S = B.T @ B / post.sigma2 + torch.eye(post.p, dtype=B.dtype, device=B.device) / post.g
            post.cache[key] = torch.linalg.cholesky(S)
        return B, post.cache[key]

    def solve(self, post, w0, eps, chains, init=None):
        B, L = self._factor(post)
        w0d, epsd = w0.double(), eps.reshape(eps.shape[0], -1).double()
        if post.m <= post.p:
            alpha = torch.cholesky_solve((epsd - w0d @ B.T).T, L).T  # shape: (b, m)
            z = w0d + post.g * alpha @ B
        else:
            w_n = w0d + (post.g / post.sigma2) * epsd @ B
            z = torch.cholesky_solve((w_n / post.g).T, L).T
        z = z.to(w0.dtype)
        yield SamplerState(self.key, chains, 0, z)
        return z, z

    def image_variance(self, post: Posterior) -> torch.Tensor:
        """Exact diag(J̃ H⁻¹ J̃ᵀ), shape ``image_shape`` (float64)."""
        Jt, _ = self.dense(post)
        B, L = self._factor(post)
        if post.m <= post.p:  # H⁻¹ = gI − g² Bᵀ(K+σ²I)⁻¹B
            W = torch.linalg.solve_triangular(L, B @ Jt.T, upper=False)  # shape: (m, d)
            var = post.g * Jt.pow(2).sum(1) - post.g**2 * W.pow(2).sum(0)
        else:
            W = torch.linalg.solve_triangular(L, Jt.T, upper=False)  # shape: (p, d)
            var = W.pow(2).sum(0)
        return var.clamp(min=0).reshape(post.model.image_shape)

    def log_evidence(self, post: Posterior, g: float | None = None) -> float:
        """log N(r; 0, g AJ̃J̃ᵀAᵀ + σ²I) of the data residual r under prior variance g."""
        g = post.g if g is None else float(g)
        _, B = self.dense(post)
        r = post.data_residual.reshape(-1).double()
        m, s2 = post.m, post.sigma2
        if m <= post.p:
            S = g * B @ B.T + s2 * torch.eye(m, dtype=B.dtype, device=B.device)
            L = torch.linalg.cholesky(S)
            a = torch.linalg.solve_triangular(L, r[:, None], upper=False)
            logdet = 2 * torch.log(torch.diagonal(L)).sum()
            quad = a.pow(2).sum()
        else:  # determinant lemma and Woodbury in p dimensions
            Hd = B.T @ B / s2 + torch.eye(post.p, dtype=B.dtype, device=B.device) / g
            L = torch.linalg.cholesky(Hd)
            logdet = m * math.log(s2) + post.p * math.log(g) + 2 * torch.log(torch.diagonal(L)).sum()
            a = torch.linalg.solve_triangular(L, (B.T @ r)[:, None], upper=False)
            quad = r.pow(2).sum() / s2 - a.pow(2).sum() / s2**2
        return float(-0.5 * (quad + logdet + m * math.log(2 * math.pi)))


SAMPLERS: dict[str, type[Sampler]] = {cls.key: cls for cls in (SGDSampler, CGSampler, ExactSampler)}


def make_sampler(name: str = "sgd", cfg: SamplerConfig | dict | None = None) -> Sampler:
    """The sampler registered under ``name`` ("sgd" | "cg" | "exact") with its config."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if isinstance(cfg, dict):
        cfg = SamplerConfig.from_dict(cfg)
    return SAMPLERS[name](cfg)


# --------------------------------------------------------------------------------------------
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
) -> Generator[EMState, None, Posterior]:
    """Sample-based EM for the prior variance g (σ² fixed), one :class:`EMState` per round.

    Each round solves the mean offset u (warm-started), draws ``n_samples`` zero-mean samples
    (same chain seeds every round, warm-started), sets γ̂ = σ⁻² mean_k ||AJ̃z_k||² clamped to
    [1, m − 1] and g ← ||u||² / γ̂. Stops early when |Δg| / g < ``rtol``. Returns the posterior
    with the final g.

    Hooks for sharded runs (:func:`dipuq.samplers.distributed.em_hooks`): ``sample_fn(sampler, post,
    n_samples, seed, init)`` draws a round's samples (default ``sampler.sample(..., keep_warm=True)``;
    its ``gamma`` must cover all chains), and ``sync(g_new)`` returns the g every process adopts.
    """
    if n_rounds < 1 or n_samples < 1:
        raise DipuqError("EM needs n_rounds >= 1 and n_samples >= 1")
    mean_warm, sample_warm = None, None
    for k in range(n_rounds):
        mean = sampler.mean(post, init=mean_warm)
        if sample_fn is None:
            res = sampler.sample(post, n_samples, seed=seed, init=sample_warm, keep_warm=True)
        else:
            res = sample_fn(sampler, post, n_samples, seed, sample_warm)
        if isinstance(sampler, SGDSampler):
            rel = max((h["grad_norm"][-1] for h in res.history if h["grad_norm"]), default=0.0)
            if rel > SGD_CONVERGED:  # unconverged samples carry prior misfit: γ̂ and g go wrong
                warnings.warn(f"EM round {k}: sgd samples unconverged (error bound {rel:.2g} of the samples' data fit "
                              f"after {sampler.cfg.n_steps} steps); raise SamplerConfig.n_steps or "
                              f"precond_max_rank, or use sampler 'cg'", RuntimeWarning, stacklevel=2)
        gamma = min(max(res.gamma, 1.0), post.m - 1.0)
        u_norm2 = float(mean.u.double().pow(2).sum())
        g_new = u_norm2 / gamma
        if sync is not None:
            g_new = sync(g_new)
        if not (math.isfinite(g_new) and g_new > 0):
            raise DivergenceError(f"EM round {k}: g update gave {g_new} (||u||^2 = {u_norm2}, gamma = {gamma})")
        yield EMState(k, post.g, u_norm2, gamma, g_new, mean, res)
        if isinstance(sampler, SGDSampler) and res.warm is not None:
            # samples scale like sqrt(g): rescale the previous solutions as the next start
            sample_warm = res.warm * math.sqrt(g_new / post.g)
        else:
            sample_warm = res.warm
        mean_warm = mean.warm
        old = post.g
        post = post.with_g(g_new)
        if rtol > 0 and abs(g_new - old) < rtol * old:
            break
    return post


def run_em(
    post: Posterior,
    sampler: Sampler | str = "sgd",
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
    if isinstance(sampler, str):
        sampler = make_sampler(sampler)
    seed = _resolve_seed(seed, generator)
    gen = iterate_em(post, sampler, n_rounds, n_samples, seed, rtol, sample_fn=sample_fn, sync=sync)
    g_trace, gamma_trace, last = [post.g], [], None
    while True:
        try:
            st = next(gen)
        except StopIteration as stop:
            final = stop.value
            break
        if callback is not None:
            callback(st)
        g_trace.append(st.g_new)
        gamma_trace.append(st.gamma)
        last = st.mean
    return EMResult(final, g_trace, gamma_trace, last)
