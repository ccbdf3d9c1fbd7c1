"""Sample-based EM for g against the exact evidence maximiser on the tiny 2D problem."""

import math

import pytest
import torch
from scipy.optimize import minimize_scalar

from dipuq.samplers import SamplerConfig, iterate_em, make_sampler, run_em
from test_samplers import tiny_problem


@pytest.fixture(scope="module")
def setup():
    post = tiny_problem(g=1.0)
    ex = make_sampler("exact")
    res = minimize_scalar(lambda lg: -ex.log_evidence(post, math.exp(lg)), bounds=(math.log(1e-8), math.log(1e2)),
                          method="bounded", options={"xatol": 1e-5})
    g_star = math.exp(res.x)
    # the bounded search found an interior maximum: a log-spaced grid agrees to within one step
    grid = torch.logspace(-6, -1, 51)
    le = [ex.log_evidence(post, float(g)) for g in grid]
    g_grid = float(grid[max(range(len(le)), key=le.__getitem__)])
    assert abs(math.log(g_grid / g_star)) <= math.log(10) / 10
    return post, g_star


def test_log_evidence_primal_and_dual_forms_agree(setup):
    post, g_star = setup
    small = tiny_problem(ch=2)  # p = 56 < m = 128: determinant lemma in p dimensions
    ex = make_sampler("exact")
    B = ex.dense(small)[1]
    S = g_star * B @ B.T + small.sigma2 * torch.eye(small.m, dtype=B.dtype)
    r = small.data_residual.reshape(-1).double()
    direct = torch.distributions.MultivariateNormal(torch.zeros_like(r), S).log_prob(r)
    assert ex.log_evidence(small, g_star) == pytest.approx(float(direct), rel=1e-9)


@pytest.mark.parametrize("name", ["cg", "exact"])
def test_em_converges_to_evidence_maximiser(setup, name):
    post, g_star = setup
    sampler = make_sampler(name, SamplerConfig(chains_per_batch=64))
    res = run_em(post, sampler, n_rounds=40, n_samples=64, seed=3, rtol=1e-4)
    # 64 samples: γ̂ has ≈ 1 % Monte Carlo error and the fixed point amplifies it (measured: 1.3 %
    # off g* after 18 rounds for cg and exact with 64 samples; 18 % with 16); issue #4's bar is 10 %.
    assert abs(res.g_trace[-1] / g_star - 1) < 0.10
    assert res.posterior.g == res.g_trace[-1]
    assert all(1 <= gm <= post.m - 1 for gm in res.gamma_trace)


def test_em_with_sgd_warm_starts(setup):
    post, g_star = setup
    # grad_tol 1e-3: the early stop lets γ̂ be off by up to 2·grad_tol, and warm-started rounds
    # repeat the same error (measured with the default 0.01: g/g* = 1.105 after 6 rounds)
    sampler = make_sampler("sgd", SamplerConfig(n_steps=60, chains_per_batch=64, grad_tol=1e-3))
    states = list(iterate_em(post.with_g(2 * g_star), sampler, n_rounds=6, n_samples=64, seed=3))
    gs = [st.g_new for st in states]
    # from 2 g* the MacKay fixed-point iteration halves the gap per round (measured g/g* = 1.43,
    # 1.22, 1.12, 1.07, 1.05, 1.03): within 10 % after 6 rounds, moving monotonically to g*.
    assert abs(gs[-1] / g_star - 1) < 0.10
    assert all(a >= b for a, b in zip(gs, gs[1:]))


def test_data_driven_initial_g(setup):
    """g_init = 0 (default) starts EM at mean((θ*/s)²), the fitted weights' size in prior units."""
    post, _ = setup
    want = float((post.model.theta_map.double() / post.scale.double()).pow(2).mean())
    assert post.weight_scale_g() == pytest.approx(want, rel=1e-12)
    assert want > 0
    zero = post.with_g(1.0)
    zero.model = type("M", (), {"theta_map": torch.zeros_like(post.model.theta_map)})()
    assert zero.weight_scale_g() == 1.0  # nothing to measure: the old default


def test_em_rtol_stops_once_g_settles(setup):
    post, _ = setup
    sampler = make_sampler("exact")

    def rounds(rtol):
        return len(list(iterate_em(post, sampler, n_rounds=3, n_samples=8, seed=3, rtol=rtol)))

    # from g = 1 the first round drops g to ~1e-3, |Δg|/g ≈ 1: rtol = 10 stops there, 0 never stops
    assert rounds(0.0) == 3 and rounds(10.0) == 1


def test_em_warns_when_the_sampler_reports_unconverged_samples(setup):
    post, _ = setup
    sampler = make_sampler("sgd", SamplerConfig(n_steps=3, precond_rank=0, grad_tol=0, chains_per_batch=8))
    with pytest.warns(RuntimeWarning, match="EM round 0: sgd samples unconverged"):
        run_em(post, sampler, n_rounds=1, n_samples=8, seed=0)


def test_em_reports_progress_inside_a_round(setup):
    """step_callback sees every solver step of a round's mean solve (chains [-1]) and of its samples,
    and the pipeline's bar shows which one runs, the iteration and the current error."""
    from dipuq.run.stages.posterior import step_progress

    post, _ = setup
    seen, shown = [], []

    class Bar:
        def set_postfix_str(self, s):
            shown.append(s)

    show = step_progress(Bar(), em_samples=4, every_s=0.0)

    def on_step(st):
        seen.append((tuple(st.chains), st.step, st.done))
        show(st)

    list(iterate_em(post, make_sampler("cg", SamplerConfig(chains_per_batch=4)), n_rounds=1, n_samples=4,
                    seed=3, step_callback=on_step))
    mean_steps = [s for s in seen if s[0] == (-1,)]
    sample_steps = [s for s in seen if s[0] == (0, 1, 2, 3) and not s[2]]
    assert len(mean_steps) > 1 and len(sample_steps) > 1
    assert any(s.startswith("mean, iteration ") for s in shown)
    assert any(s.startswith("4 samples, iteration ") and ", error " in s for s in shown)
