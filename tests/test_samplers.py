"""Samplers against the dense posterior on a tiny 2D problem (16², p = 1416, m = 128)."""

import math
from dataclasses import fields

import pytest
import torch

from dipuq.errors import ConfigError, DipuqError, DivergenceError
from dipuq.posterior.linearise import LinearisedModel
from dipuq.operators.base import MatrixOperator
from dipuq.posterior.model import Posterior
from dipuq.samplers import SAMPLERS, Sampler, SamplerConfig, chain_generator, drive, make_sampler
from dipuq.testing import check_adjoint
from dipuq.maps.uncertainty import UncertaintyMaps
from dipuq.samplers.moments import Moments


def tiny_net(ndim=2, ch=12, seed=0):
    torch.manual_seed(seed)
    Conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(
        Conv(1, ch, 3, padding=1), torch.nn.GroupNorm(2, ch), torch.nn.SiLU(),
        Conv(ch, ch, 3, padding=1), torch.nn.GroupNorm(2, ch), torch.nn.SiLU(), Conv(ch, 1, 1),
    )


def tiny_problem(n=16, ch=12, m=128, noise=0.3, g=2.7e-4, ndim=2, seed=0):
    """Random Gaussian A (m < d: under-determined), a box phantom, Gaussian noise.

    g = 2.7e-4 is the exact evidence maximiser of this problem (see test_em.py), so the
    posterior is in the regime EM would put it in (effective dimension ≈ 67 of 128).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) * ndim
    d = n**ndim
    z = torch.randn(1, 1, *shape, generator=gen)
    A = MatrixOperator(torch.randn(m, d, generator=gen) / math.sqrt(d), shape, (m,))
    x = torch.zeros(shape)
    x[(slice(n // 4, 3 * n // 4),) * ndim] = 1.0
    y = A(x) + noise * torch.randn(m, generator=gen)
    model = LinearisedModel(tiny_net(ndim, ch, seed), z, A)
    return Posterior(model, A, y, sigma2=noise**2, g=g, n_probes=None)


@pytest.fixture(scope="module")
def post():
    return tiny_problem()


@pytest.fixture(scope="module")
def exact(post):
    ex = make_sampler("exact")
    return ex, ex.image_variance(post).sqrt()


def _dense_H(post):
    B = make_sampler("exact").dense(post)[1]
    return B, B.T @ B / post.sigma2 + torch.eye(post.p, dtype=B.dtype) / post.g


@pytest.mark.parametrize("ch,m", [(12, 128), (2, 128)])  # m < p (dual Cholesky) and m > p (primal)
def test_exact_variance_equals_dense_inverse(ch, m):
    post = tiny_problem(ch=ch, m=m)
    assert (post.m <= post.p) == (ch == 12)
    ex = make_sampler("exact")
    Jt = ex.dense(post)[0]
    _, H = _dense_H(post)
    var = (Jt @ torch.linalg.inv(H) @ Jt.T).diagonal()
    # float64 Woodbury vs direct inverse: agree to ~1e-10 relative (measured); 1e-7 is loose.
    torch.testing.assert_close(ex.image_variance(post).reshape(-1), var, rtol=1e-7, atol=0)


def test_exact_samples_have_the_exact_covariance(post, exact):
    ex, std = exact
    res = ex.sample(post, 1000, seed=7)
    rel = (res.moments.std() - std).abs() / std
    # 1000 samples: rel. s.e. of a std is 1/sqrt(2·1000) = 2.2 %, median |error| ≈ 0.67·2.2 % = 1.5 %
    # (measured 1.4 %); 3 % fails if the covariance were off by more than ~3 %.
    assert rel.median() < 0.03
    # the distribution-free MC standard error matches the Gaussian one, std/sqrt(2K), to 10 %
    se = res.moments.std_se()
    assert ((se / (res.moments.std() / math.sqrt(2 * 1000))).median() - 1).abs() < 0.1


@pytest.mark.parametrize("name,cfg", [
    ("sgd", SamplerConfig(n_steps=100, chains_per_batch=32, grad_tol=0)),  # all steps: solver accuracy
    ("sgd", SamplerConfig(n_steps=150, chains_per_batch=32, precond_rank=0, grad_tol=0)),  # plain Nesterov
    ("cg", SamplerConfig(chains_per_batch=32, precond_rank=32)),
    ("cg", SamplerConfig(chains_per_batch=32, precond_rank=32, cg_block=True)),  # one Krylov space
])
def test_sampler_std_error_is_only_monte_carlo_noise(post, exact, name, cfg):
    ex, std = exact
    K = 64
    ref = ex.sample(post, K, seed=11, keep_z=True)
    err_exact = ((ref.moments.std() - std).abs() / std).median()
    res = make_sampler(name, cfg).sample(post, K, seed=11, keep_z=True)
    err = ((res.moments.std() - std).abs() / std).median()
    # Same chain seeds, so both estimators see the same Monte Carlo noise (≈ 6 % median error for
    # K = 64): only solver error can make the sampler worse. Issue #4's bar is 1.25x.
    assert err <= 1.25 * err_exact
    # per-sample: the image samples themselves agree (sgd measured 1e-6, cg 3e-4 relative)
    xs, xe = post.J(res.z), post.J(ref.z)
    assert (xs - xe).norm() / xe.norm() < 1e-2
    assert 50 < res.gamma < 100  # effective dimension ≈ 67 of m = 128 (exact tr(σ⁻²MH⁻¹) = 67.4)


@pytest.mark.parametrize("name", ["sgd", "cg"])
def test_linear_model_mean_matches_exact(post, name):
    B, H = _dense_H(post)
    r = post.data_residual.reshape(-1).double()
    u = torch.linalg.solve(H, B.T @ r / post.sigma2)
    mean = make_sampler(name, SamplerConfig(n_steps=150, grad_tol=0)).mean(post)
    # sgd: 150 Nesterov steps reach 1e-6 relative here (measured 4e-7); cg stops at residual
    # 1e-4 (measured 2e-5 in u); 1e-3 in weights and image is a safe bound for both.
    assert (mean.u.double() - u).norm() / u.norm() < 1e-3
    img = post.model.mean.double() + (make_sampler("exact").dense(post)[0] @ (post.w_center.double() + u)).reshape(16, 16)
    assert (mean.image.double() - img).norm() / img.norm() < 1e-3


def test_block_cg_solves_the_same_systems_in_fewer_iterations(post):
    cfg = {"chains_per_batch": 16, "precond_rank": 0, "cg_tol": 1e-6}  # unpreconditioned: many iterations
    res = {blk: make_sampler("cg", SamplerConfig(cg_block=blk, **cfg)).sample(post, 16, seed=3, keep_z=True)
           for blk in (False, True)}
    # the same chains to the same tolerance: the samples agree
    xs, xb = post.J(res[False].z), post.J(res[True].z)
    assert (xs - xb).norm() / xs.norm() < 1e-4
    # 16 right-hand sides in one Krylov space: fewer steps than 16 separate CG runs (measured 12
    # vs 40 here, where 16 × 12 directions already span R^128; 10 vs 21 with a rank-32 preconditioner)
    assert res[True].steps < 0.8 * res[False].steps


def test_chain_seed_streams_split_and_merge(post):
    s = make_sampler("cg", SamplerConfig(chains_per_batch=3))
    full = s.sample(post, 8, seed=5, keep_z=True)
    a = s.sample(post, chains=[0, 2, 4, 6], seed=5, keep_z=True)
    b = make_sampler("cg", SamplerConfig(chains_per_batch=8)).sample(post, chains=[1, 3, 5, 7], seed=5, keep_z=True)
    # chain k depends only on (seed, k): the split reproduces the union (CG rounding only, 1e-4)
    torch.testing.assert_close(a.z, full.z[0::2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.z, full.z[1::2], rtol=1e-4, atol=1e-4)
    merged = a.moments.merge(b.moments)
    torch.testing.assert_close(merged.variance(), full.moments.variance(), rtol=1e-3, atol=1e-6)
    g1, g2 = chain_generator(5, 3), chain_generator(5, 3)
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert not torch.equal(torch.randn(4, generator=chain_generator(5, 3)), torch.randn(4, generator=chain_generator(6, 3)))
    # a generator gives the run seed; the same generator state gives the same samples
    r1 = s.sample(post, 2, generator=torch.Generator().manual_seed(0))
    r2 = s.sample(post, 2, generator=torch.Generator().manual_seed(0))
    assert r1.seed == r2.seed and torch.equal(r1.moments.s2, r2.moments.s2)


def test_sgd_divergence_is_detected(post):
    # lr·λmax = 3 is beyond Nesterov's stability limit 2(1+μ)/(1+2μ) = 1.36 at μ = 0.9
    s = make_sampler("sgd", SamplerConfig(n_steps=200, lr_factor=3.0))
    with pytest.raises(DivergenceError, match="diverged at step"):
        s.sample(post, 4, seed=0)
    # a NaN in the data is refused before sampling
    with pytest.raises(DipuqError, match="NaN"):
        Posterior(post.model, post.A, torch.full((128,), float("nan")), sigma2=1.0)


def test_sgd_diagnostics_and_states(post):
    s = make_sampler("sgd", SamplerConfig(n_steps=50, chains_per_batch=4, grad_tol=0))  # all 50 steps
    states = list(s.iterate(post, [0, 1, 2, 3, 4], seed=0))
    assert [st.done for st in states].count(True) == 2  # batches of 4 + 1
    steps = [st for st in states if not st.done and st.chains == [0, 1, 2, 3]]
    assert len(steps) == 50 and steps[0].objective.shape == (4,)
    # the gradient norm falls by orders of magnitude over 50 steps (measured 1e-4 of its start)
    assert float(steps[-1].grad_norm.max()) < 1e-2 * float(steps[0].grad_norm.min())
    res = s.sample(post, 4, seed=0)
    assert len(res.history) == 1 and len(res.history[0]["objective"]) == 50


def test_exact_refuses_big_problems_and_bad_config(post):
    with pytest.raises(DipuqError, match="use sampler 'sgd' or 'cg'"):
        make_sampler("exact", SamplerConfig(max_dense=1e4)).sample(tiny_problem(ch=8), 2, seed=0)
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_sampler("mcmc")
    with pytest.raises(ConfigError, match="unknown option"):
        make_sampler("sgd", {"n_stepz": 3})
    with pytest.raises(ConfigError, match="momentum"):
        SamplerConfig(momentum=1.0)
    with pytest.raises(DipuqError, match="Generator"):
        make_sampler("sgd").sample(post, 2)


def test_posterior_save_load_round_trip(post, tmp_path):
    path = post.with_g(1.5e-4).save(tmp_path / "post.pt")
    back = Posterior.load(path, post.model, post.A)
    assert back.g == 1.5e-4 and back.sigma2 == post.sigma2 and back.prior_center == post.prior_center
    assert torch.equal(back.scale, post.scale) and torch.equal(back.y, post.y)
    v = torch.randn(2, post.p, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back.H(v), post.with_g(1.5e-4).H(v))
    other = tiny_problem(seed=1)
    with pytest.raises(DipuqError, match="different weights"):
        Posterior.load(path, other.model, other.A)
    (tmp_path / "junk.pt").write_text("not a posterior")
    with pytest.raises(DipuqError, match="cannot read"):
        Posterior.load(tmp_path / "junk.pt", post.model, post.A)


def test_3d_end_to_end(tmp_path):
    """16³ volume, sparse random A, MC-estimated g-prior, EM round, sgd samples streamed to maps."""
    gen = torch.Generator().manual_seed(0)
    n, m = 16, 300
    d = n**3
    dense = torch.randn(m, d, generator=gen) * (torch.rand(m, d, generator=gen) < 0.02)
    A = MatrixOperator(dense.to_sparse_csr(), (n, n, n), (m,))
    z = torch.randn(1, 1, n, n, n, generator=gen)
    model = LinearisedModel(tiny_net(3, ch=4), z, A)
    y = A(model.mean) + 0.1 * torch.randn(m, generator=gen)
    post = Posterior(model, A, y, sigma2=float((y - A(model.mean)).double().pow(2).mean()), g=1e-3, n_probes=8, generator=gen)
    from dipuq.samplers import run_em

    s = make_sampler("sgd", SamplerConfig(n_steps=20, chains_per_batch=4))
    em = run_em(post, s, n_rounds=1, n_samples=4, seed=0)
    assert len(em.g_trace) == 2 and em.g_trace[-1] > 0
    mom = Moments(model.image_shape)
    res = s.sample(em.posterior, 8, seed=1, moments=mom)
    assert res.moments is mom and mom.n == 8
    maps = UncertaintyMaps.from_moments(model.mean, mom)
    assert maps.std.shape == (16, 16, 16) and (maps.std > 0).all()
    back = UncertaintyMaps.load(maps.save(tmp_path / "maps.npz"))
    assert (back.std == maps.std).all() and back.n_samples == 8


def test_sgd_auto_momentum_converges_where_fixed_momentum_does_not():
    """Ill-conditioned case (g = 1000 g*, rank-4 preconditioner: κ(P⁻¹H) ≈ 4.7e4).

    Nesterov with momentum (√κ−1)/(√κ+1) needs O(√κ) ≈ 200 steps per e-fold, fixed 0.9 needs O(κ/10).
    """
    post = tiny_problem(g=0.27)
    std = make_sampler("exact").image_variance(post).sqrt()
    K = 32
    err_exact = ((make_sampler("exact").sample(post, K, seed=11).moments.std() - std).abs() / std).median()
    errs = {}
    for mom in (None, 0.9):
        cfg = SamplerConfig(n_steps=1000, chains_per_batch=K, precond_rank=4, precond_max_rank=4, momentum=mom,
                            grad_tol=0)
        res = make_sampler("sgd", cfg).sample(post, K, seed=11)
        errs[mom] = ((res.moments.std() - std).abs() / std).median() / err_exact
    # measured: auto momentum 0.96x the exact sampler's MC error, fixed 0.9 2.64x (std still too large)
    assert errs[None] <= 1.25
    assert errs[0.9] > 2.0


@pytest.mark.parametrize("rank", [64, 0])
def test_sgd_early_stop_bounds_each_samples_error(post, rank):
    """The stop ||∇L||_{P⁻¹} < grad_tol·σ⁻¹||AJ̃z|| guarantees σ⁻²||AJ̃e||² ≤ ||e||²_H ≤
    grad_tol²·σ⁻²||AJ̃z||² for each chain's error e = z − z* (P ⪯ H)."""
    tol = 0.01
    ref = make_sampler("exact").sample(post, 8, seed=5, keep_z=True)
    s = make_sampler("sgd", SamplerConfig(n_steps=2000, chains_per_batch=8, precond_rank=rank, grad_tol=tol))
    res = s.sample(post, 8, seed=5, keep_z=True)
    assert res.steps < 2000  # it did stop early
    e = (res.z - ref.z).double()
    energy = (e * post.H(e.float()).double()).sum(1)
    fit = post.AJ(res.z).reshape(8, -1).double().pow(2).sum(1) / post.sigma2
    assert bool((energy <= tol**2 * fit).all()), (energy / fit).sqrt()
    final = max(h["grad_norm"][-1] for h in res.history)
    assert final < tol


def test_nystrom_sketch_grows_and_is_exact_at_full_rank():
    from dipuq.samplers import NystromSketch, nystrom

    gen = torch.Generator().manual_seed(0)
    B = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    S = B @ B.T  # rank 12 PSD
    sk = NystromSketch(lambda V: V @ S, 40)
    sk.extend(6)
    U6, lam6 = sk.factor()
    assert U6.shape == (40, 6) and bool((lam6[:-1] >= lam6[1:]).all())
    sk.extend(16)  # 10 more columns, orthogonal to the first 6
    assert sk.rank == 16
    assert torch.allclose(sk.omega.T @ sk.omega, torch.eye(16, dtype=torch.float64), atol=1e-10)
    U, lam = sk.factor()
    # rank ≥ rank(S): exact up to the stabilising shift ν = eps32·||Y||·√n (measured 1.3e-5);
    # with 6 columns the error is 0.6
    assert ((U * lam) @ U.T - S).norm() / S.norm() < 1e-4
    U2, lam2 = nystrom(lambda V: V @ S, 40, 16)
    assert ((U2 * lam2) @ U2.T - S).norm() / S.norm() < 1e-4


def test_lowrank_inverse_equals_the_dense_operator():
    """outside·v + U diag(inside − outside) Uᵀ v equals outside·(I − UUᵀ)v + U diag(inside) Uᵀ v to
    float64 rounding of outside·||v||, also where inside/outside is 1e-12 (sgd's captured subspace)."""
    from dipuq.samplers.nystrom import lowrank_inverse

    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(60, 10, generator=gen, dtype=torch.float64))[0]
    v = torch.randn(3, 60, generator=gen, dtype=torch.float64)
    for inside, outside in ((torch.logspace(0, -6, 10, dtype=torch.float64), 1.0),
                            (torch.logspace(-3, -12, 10, dtype=torch.float64), 2.0)):
        P = outside * (torch.eye(60, dtype=torch.float64) - U @ U.T) + (U * inside) @ U.T
        got = lowrank_inverse(U, inside, outside)(v)
        assert float((got - v @ P).norm(dim=1).max()) < 1e-13 * outside * float(v.norm(dim=1).min())
        assert lowrank_inverse(U, inside, outside)(v.float()).dtype == torch.float32


def test_nystrom_power_iterations_sharpen_a_slowly_decaying_spectrum():
    """One subspace iteration (precond_power_iters = 1) leaves a much smaller approximation error on
    a slowly decaying spectrum (λ_j = 1/j, n = 200, rank 20: ||S − UΛUᵀ||₂ is 5.4× the optimal
    λ₂₁ for the plain sketch and 2.2× with one iteration, measured); the error is what sets the
    condition number left to the preconditioned solver."""
    from dipuq.samplers import NystromSketch

    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    ev = 1.0 / torch.arange(1, 201, dtype=torch.float64)
    S = (Q * ev) @ Q.T
    errs = []
    for q in (0, 1):
        calls = []
        sk = NystromSketch(lambda V: calls.append(V.shape[0]) or V @ S, 200, power_iters=q)
        sk.extend(20)
        assert sum(calls) == 20 * (1 + q)  # q more products per column
        U, lam = sk.factor()
        assert torch.allclose(U.T @ U, torch.eye(20, dtype=torch.float64), atol=1e-10)
        errs.append(float(torch.linalg.matrix_norm(S - (U * lam) @ U.T, 2) / ev[20]))
    assert errs[1] < 0.5 * errs[0], errs
    sk.extend(30)  # growing a power-iterated sketch keeps its test vectors orthonormal
    assert torch.allclose(sk.omega.T @ sk.omega, torch.eye(30, dtype=torch.float64), atol=1e-10)


def test_sgd_preconditioner_rank_grows_until_kappa_target(post):
    """The rank doubles from precond_rank while λmax(P⁻¹H) > precond_kappa (and stops at the cap)."""
    loose = make_sampler("sgd", SamplerConfig(precond_rank=8, precond_kappa=1e12, precond_max_rank=64))
    p1 = post.with_g(post.g)
    p1.cache = {}
    assert loose.describe(p1)["precond_rank"] == 8  # target met at once
    tight = make_sampler("sgd", SamplerConfig(precond_rank=8, precond_kappa=1.0, precond_max_rank=64))
    p2 = post.with_g(post.g)
    p2.cache = {}
    info = tight.describe(p2)
    assert info["precond_rank"] == 64  # 8 → 16 → 32 → 64 (cap) while κ > 1
    assert info["kappa"] < make_sampler("sgd", SamplerConfig(precond_rank=8)).lambda_max(p1)


class _Reads:
    """A SamplerConfig that records the names of the fields read from it."""

    def __init__(self, cfg, seen):
        self._cfg, self._seen = cfg, seen

    def __getattr__(self, key):
        self._seen.add(key)
        return getattr(self._cfg, key)


def test_each_sampler_reads_exactly_the_config_keys_it_declares(post):
    # every declared key is a SamplerConfig field and every field is read by some sampler or the driver
    assert set(Sampler.keys).union(*(cls.keys for cls in SAMPLERS.values())) == {f.name for f in fields(SamplerConfig)}
    # short runs that touch every option (cosine decay reads lr_final)
    cfg = SamplerConfig(chains_per_batch=2, n_steps=5, lr_decay="cosine", precond_rank=8, cg_max_iter=5, cg_block=True)
    for name, cls in SAMPLERS.items():
        assert cls.name == name and set(Sampler.keys) <= set(cls.keys)
        s, seen = make_sampler(name, cfg), set()
        s.cfg = _Reads(cfg, seen)
        p = post.with_g(post.g)
        p.cache = {}
        s.describe(p), s.sample(p, 3, seed=0), s.mean(p)
        assert seen == set(cls.keys), (name, seen ^ set(cls.keys))


def test_drive_returns_what_the_generator_returns():
    def states():
        yield 1
        yield 2
        return "done"

    seen = []
    assert drive(states(), seen.append) == "done" and seen == [1, 2]
    assert drive(states()) == "done"


def test_posterior_operators_are_the_compositions_they_stand_for(post):
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(3, post.p, generator=gen)
    u = torch.randn(3, post.m, generator=gen)
    x = torch.randn(3, *post.model.image_shape, generator=gen)
    model, s, A = post.model, post.scale, post.A
    # bit for bit the products they replace: J̃z = J(s ⊙ z), AJ̃z = A(J(s ⊙ z)), ...
    assert torch.equal(post.J(v), model.jvp(v * s)) and torch.equal(post.J.T(x), model.vjp(x) * s)
    assert torch.equal(post.AJ(v), A(model.jvp(v * s))) and torch.equal(post.AJ.T(u), model.vjp(A.T(u)) * s)
    assert torch.equal(post.H(v), post.AJ.T(post.AJ(v)) / post.sigma2 + v / post.g)
    assert torch.equal(post.kernel(u), post.g * post.AJ(post.AJ.T(u)) + post.sigma2 * u)
    # against the dense oracle: float32 J/A products (measured 2.7e-7 relative for both; 1e-5 is loose)
    B, H = _dense_H(post)
    Hv = v.double() @ H
    assert (post.H(v).double() - Hv).norm() / Hv.norm() < 1e-5
    K = post.g * B @ B.T + post.sigma2 * torch.eye(post.m, dtype=B.dtype)
    Ku = u.double() @ K
    assert (post.kernel(u).double() - Ku).norm() / Ku.norm() < 1e-5
    assert check_adjoint(post.AJ) < 1e-5 and post.with_g(2 * post.g).H(v).ne(post.H(v)).any()


def test_warm_start_and_convergence_capabilities(post):
    warm = torch.ones(2, 3)
    assert torch.equal(make_sampler("sgd").rescale_warm(warm, 1.0, 4.0), 2 * warm)  # samples scale like √g
    assert make_sampler("cg").rescale_warm(warm, 1.0, 4.0) is warm  # α of (K + σ²I)α = ε − AJ̃w₀: as is
    short = make_sampler("sgd", SamplerConfig(n_steps=3, precond_rank=0, grad_tol=0))
    res = short.sample(post, 2, seed=0)
    assert "sgd samples unconverged" in short.unconverged(res) and "after 3 steps" in short.unconverged(res)
    assert make_sampler("cg").unconverged(res) is None  # no per-sample error bound


def test_lr_final_sets_the_end_of_the_cosine_decay(post):
    def z(**kw):
        cfg = SamplerConfig(n_steps=30, chains_per_batch=2, precond_rank=8, grad_tol=0, **kw)
        return make_sampler("sgd", cfg).sample(post, 2, seed=0, keep_z=True).z

    assert not torch.equal(z(lr_decay="cosine", lr_final=0.1), z(lr_decay="cosine", lr_final=0.5))
    assert torch.equal(z(lr_final=0.1), z(lr_final=0.5))  # without decay it is not used


def test_diverge_factor_sets_when_a_growing_objective_is_an_error(post):
    def step(factor):
        s = make_sampler("sgd", SamplerConfig(n_steps=200, lr_factor=3.0, diverge_factor=factor))
        with pytest.raises(DivergenceError, match="diverged at step") as err:
            s.sample(post, 2, seed=0)
        return int(str(err.value).split("step ")[1].split(":")[0])

    # lr·λmax = 3 is unstable and the objective grows geometrically: a 1e8x larger allowance is
    # used up later (measured: step 11 at the default 1e4, step 25 at 1e12)
    assert step(1e4) < step(1e12)


def test_pcg_kappa_measures_the_preconditioned_condition_number():
    from dipuq.samplers.nystrom import krylov_iterations, pcg_kappa

    lam = torch.logspace(0, 3, 50, dtype=torch.float64)  # κ = 1000 on 50 distinct eigenvalues
    S = lambda v: v * lam  # noqa: E731
    # a lower bound that converges: log-spaced eigenvalues crowd the low end, which Lanczos resolves
    # last (measured 594, 860, 1000.0 after 30, 50, 100 steps)
    assert 500 < pcg_kappa(S, lambda v: v, (50,), n_iter=30) < pcg_kappa(S, lambda v: v, (50,), n_iter=50) < 1000
    assert pcg_kappa(S, lambda v: v, (50,), n_iter=100) == pytest.approx(1000, rel=1e-6)
    # a preconditioner flattening the top half leaves κ = λ_24 / λ_0 = 29.5 (exact after 30 steps)
    P = torch.where(lam > lam[24], lam / lam[24], torch.ones_like(lam))
    assert pcg_kappa(S, lambda v: v / P, (50,), n_iter=40) == pytest.approx(float(lam[24]), rel=1e-6)
    # CG's bound: ½√κ·ln(2/ε) iterations
    assert krylov_iterations(100.0, 2e-3) == pytest.approx(5 * math.log(1000))
