"""The held-out split, the DIP's validation stop, unit invariance and the FBP-wins check.

Sizes are tiny (2D 24²–32², a 2-scale U-Net with 4 channels) so each fit takes a second or two.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dipuq.cli import main
from dipuq.run.config import load_config
from dipuq.data.phantoms import shepp_logan
from dipuq.operators.simulate import simulate_scan
from dipuq.data.split import ProjectionSplit, angle_groups
from dipuq.dip.driver import run_dip
from dipuq.dip.fit import DipConfig
from dipuq.dip.tv import TV_GRID
from dipuq.errors import ConfigError
from dipuq.geometry import Geometry
from dipuq.dip.networks import NetworkConfig, UNet
from dipuq.operators import RayTransform
from dipuq.run.pipeline import run_pipeline

TINY = {
    "dip.iterations": 60, "dip.network.scales": 2, "dip.network.channels": 4, "dip.network.skip_channels": 1,
    "linearise.diag_probes": 4, "posterior.em_rounds": 0, "sampler.method": "exact", "sampler.n_samples": 8,
    "output.figures": False, "output.report": False, "output.tiff": False,
}


def _scan(n=32, views=20, noise=0.02, seed=0):
    g = Geometry.parallel2d(np.linspace(0, np.pi, views, endpoint=False), (n, n))
    return simulate_scan(shepp_logan((n, n)), g, noise="gaussian", noise_level=noise,
                         generator=torch.Generator().manual_seed(seed), name="tiny")


# -- the split -------------------------------------------------------------------------------


def test_split_is_interleaved_seeded_and_at_least_two():
    angles = np.linspace(0, np.pi, 30, endpoint=False)
    s = ProjectionSplit.choose(angles, 0.1, generator=torch.Generator().manual_seed(0))
    assert len(s.held) == 3 and len(s.fit) == 27 and not set(s.held) & set(s.fit)
    assert [h // 10 for h in s.held] == [0, 1, 2]  # one in each third of the angular range
    again = ProjectionSplit.choose(angles, 0.1, generator=torch.Generator().manual_seed(0))
    other = [ProjectionSplit.choose(angles, 0.1, generator=torch.Generator().manual_seed(k)).held for k in range(1, 6)]
    assert again == s and any(o != s.held for o in other)
    assert len(ProjectionSplit.choose(angles[:12], 0.1, generator=torch.Generator()).held) == 3  # min_count
    assert not ProjectionSplit.choose(angles, 0.0).has_heldout
    with pytest.raises(ConfigError, match="fewer than 2"):
        ProjectionSplit.choose(angles[:3], 0.1, generator=torch.Generator())


def test_split_keeps_repeated_frames_together(tmp_path):
    angles = np.repeat(np.linspace(-0.8, 0.8, 12), [1, 2, 3, 1, 2, 1, 4, 1, 1, 2, 1, 1])
    s = ProjectionSplit.choose(angles, 0.2, generator=torch.Generator().manual_seed(3))
    for grp in angle_groups(angles):
        assert set(grp) <= set(s.held) or set(grp) <= set(s.fit)
    path = s.save(tmp_path / "split.json")
    assert ProjectionSplit.load(path) == s


def test_split_restricts_scan_and_geometry():
    scan = _scan(views=10)
    s = ProjectionSplit.choose(scan.angles, 0.2, generator=torch.Generator().manual_seed(0))
    held = s.restrict(scan, "held")
    assert held.projections.shape[0] == len(s.held)
    np.testing.assert_array_equal(held.projections, scan.projections[list(s.held)])
    np.testing.assert_allclose(held.angles, scan.angles[list(s.held)])


# -- the fit never reads the held-out rows; the validation stop ------------------------------


def _fit_setup(noise=0.05, views=16, n=24):
    scan = _scan(n=n, views=views, noise=noise)
    s = ProjectionSplit.choose(scan.angles, 0.2, generator=torch.Generator().manual_seed(0))
    A = RayTransform(scan.geometry.subset(np.asarray(s.fit)))
    A_H = RayTransform(scan.geometry.subset(np.asarray(s.held)))
    y = torch.as_tensor(scan.projections[list(s.fit)])
    y_H = torch.as_tensor(scan.projections[list(s.held)])
    return scan, A, A_H, y, y_H


def _net(seed=0):
    return UNet.from_config(NetworkConfig(scales=2, channels=4, skip_channels=1), ndim=2,
                            generator=torch.Generator().manual_seed(seed))


def test_heldout_rows_never_reach_the_fit():
    _, A, A_H, y, y_H = _fit_setup()
    cfg = DipConfig(iterations=40, lr=3e-3, gamma=1e-3, stop="none")
    z = torch.ones(1, 1, *A.domain_shape)
    runs = []
    for yh in (y_H, 10.0 * y_H + 3.0):  # wildly different held-out data
        net = _net()
        res = run_dip(net, A, y, cfg, x_input=z, generator=torch.Generator().manual_seed(1), validation=(A_H, yh))
        runs.append((res, net))
    (r0, n0), (r1, n1) = runs
    assert r0.history["loss"] == r1.history["loss"]  # the same trajectory, step for step
    assert r0.history["val"] != r1.history["val"]  # ... while the held-out losses differ
    assert all(torch.equal(a, b) for a, b in zip(n0.parameters(), n1.parameters()))


def test_heldout_rows_choose_only_the_tv_weight():
    # dip.gamma = "auto": the held-out rows pick one number (the TV weight) and nothing else; the
    # fit is then step for step the fit with that number given
    _, A, A_H, y, y_H = _fit_setup()
    z = torch.ones(1, 1, *A.domain_shape)
    auto = run_dip(_net(), A, y, DipConfig(iterations=30, lr=3e-3, stop="none"), x_input=z,
                   generator=torch.Generator().manual_seed(1), validation=(A_H, y_H))
    lam = auto.tv["lam"]
    assert auto.config["gamma"] == pytest.approx(lam) and lam in TV_GRID
    assert lam == min(auto.tv["table"], key=lambda r: r["heldout_mse"])["lam"]  # the held-out minimum
    fixed = run_dip(_net(), A, y, DipConfig(iterations=30, lr=3e-3, gamma=lam, stop="none"), x_input=z,
                    generator=torch.Generator().manual_seed(1), validation=(A_H, y_H))
    assert auto.history["loss"] == fixed.history["loss"]


def test_validation_stop_on_a_forced_overfit():
    # heavy noise, few angles, a noise input: the fit must start fitting the noise, the held-out
    # loss then rises, and the stop rule keeps its minimum
    _, A, A_H, y, y_H = _fit_setup(noise=0.3, views=12)
    cfg = DipConfig(iterations=3000, lr=1e-2, gamma=0.0, stop="validation", patience=100, patience_rel=0.2,
                    input="noise", network=NetworkConfig(scales=2, channels=8, skip_channels=2))
    res = run_dip(UNet.from_config(cfg.network, ndim=2, generator=torch.Generator().manual_seed(0)), A, y, cfg,
                  generator=torch.Generator().manual_seed(0), validation=(A_H, y_H))
    val = res.history["val"]
    assert res.stop_reason == "validation"
    assert res.iterations < cfg.iterations and res.best_iteration == int(np.argmin(val))
    assert res.iterations - 1 - res.best_iteration >= 100  # stopped after a full patience window
    assert val[-1] > 1.05 * min(val)  # it had started to overfit
    with torch.no_grad():
        kept = float((A_H(res.recon) - y_H).square().mean())
    assert kept == pytest.approx(min(val), rel=1e-5)  # the kept iterate is the held-out minimum
    assert res.history["misfit"][-1] < res.history["misfit"][res.best_iteration]  # training loss kept falling


def test_validation_stop_without_heldout_runs_to_the_cap():
    _, A, _, y, _ = _fit_setup()
    cfg = DipConfig(iterations=15, stop="validation")
    res = run_dip(_net(), A, y, cfg, x_input=torch.ones(1, 1, *A.domain_shape))
    assert res.stop_reason == "iterations" and res.iterations == 15


# -- the pipeline: units never matter; the FBP check ------------------------------------------


@pytest.mark.parametrize("k", [2.0**-10, 1e-3, 1e3])
def test_units_never_matter(tmp_path, k):
    scan = _scan()
    cfg = load_config(None).replace(TINY)
    base = run_pipeline(scan, cfg, tmp_path / "base", seed=0, progress=False)
    scaled = run_pipeline(scan.replace(projections=scan.projections * k, reference=scan.reference * k,
                                       noise_std=scan.noise_std * k), cfg, tmp_path / "scaled", seed=0, progress=False)
    d0, d1 = (json.loads((r.run_dir / "stages" / "03_dip" / "done.json").read_text())["summary"] for r in (base, scaled))
    assert (d0["iterations"], d0["best_iteration"], d0["stop_reason"]) == (d1["iterations"], d1["best_iteration"],
                                                                           d1["stop_reason"])
    # the TV weight is chosen in normalised units: the same choice, recorded in the run folder
    assert d0["tv_lam"] == d1["tv_lam"] and d0["gamma"] == d1["gamma"]
    tv0 = json.loads((base.run_dir / "stages" / "03_dip" / "tv.json").read_text())
    assert tv0["lam"] == d0["tv_lam"] == min(tv0["table"], key=lambda r: r["heldout_mse"])["lam"]
    g0, g1 = (json.loads((r.run_dir / "stages" / "05_posterior" / "em.json").read_text())["g_trace"][-1]
              for r in (base, scaled))
    if np.log2(k) == round(np.log2(k)):
        # a power of two: FBP and its quantile scale exactly, y / norm is the same bits: bit-identical
        np.testing.assert_array_equal(scaled.recon, np.float32(k) * base.recon)
        np.testing.assert_array_equal(scaled.std, np.float32(k) * base.std)
        assert g1 == g0
        return
    # k·y is rounded once in float32 (1 ulp). The DIP is chaotic at that level (Adam's first steps
    # are nearly sign(∇)): a 1-ulp perturbation of y *without* any change of units moves this tiny,
    # unconverged fit's recon and std (measured). Units must not matter more than that rounding
    # does: compare with it.
    # The reference perturbation is per element, like rounding (a uniform factor 1 + 2e-7 would
    # cancel in the normalisation and say nothing about rounding).
    wiggle = 1 + 2e-7 * np.random.default_rng(0).choice([-1.0, 1.0], scan.projections.shape)
    ulp = run_pipeline(scan.replace(projections=(scan.projections * wiggle).astype(np.float32)), cfg,
                       tmp_path / "ulp", seed=0, progress=False)

    def diffs(r, f):
        return (np.abs(r.recon / f - base.recon).max(), np.median(np.abs(r.std / f / base.std - 1)))

    (dr, ds), (ur, us) = diffs(scaled, k), diffs(ulp, 1.0)
    assert dr <= 3 * ur + 1e-6 * np.abs(base.recon).max() and ds <= 3 * us + 1e-6
    # PSNR: within 0.1 dB, or within 3x what the 1-ulp rounding alone moves it (the refit on all
    # angles continues the chaotic fit for another 300 steps)
    assert abs(scaled.metrics["psnr"] - base.metrics["psnr"]) <= max(0.1, 3 * abs(ulp.metrics["psnr"] - base.metrics["psnr"]))
    assert g1 == pytest.approx(g0, rel=0.05)  # g in normalised units is unit-free


def test_fbp_wins_warning_and_error(tmp_path, capsys):
    scan = _scan()
    path = tmp_path / "scan.npz"
    scan.save(path)
    # one Adam step: the network output is nowhere near the data, the FBP explains the held-out rays better
    # (no warm-up: the warmed-up network would already output the TV image)
    sets = [a for k, v in {**TINY, "dip.iterations": 1, "dip.warmup": 0}.items() for a in ("--set", f"{k}={str(v).lower()}")]
    assert main(["reconstruct", str(path), "--out", str(tmp_path / "r"), *sets]) == 0
    err = capsys.readouterr().err
    assert "explains the held-out projections better than the DIP" in err
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["fbp_wins"] is True and m["heldout_mse_fbp"] < m["heldout_mse_dip"]
    rc = main(["reconstruct", str(path), "--out", str(tmp_path / "e"), *sets, "--set", "dip.fallback=error"])
    err = capsys.readouterr().err
    assert rc == 2 and "dip.fallback = 'error'" in err and "Traceback" not in err


def test_coverage_mask_in_a_truncated_scan():
    from dipuq.operators.recon import ray_coverage

    # a detector narrower than the image: the corners are seen from some angles only
    g = Geometry.parallel2d(np.linspace(0, np.pi, 12, endpoint=False), (24, 24), det_count=20)
    cover = ray_coverage(RayTransform(g)).numpy()
    assert cover[12, 12] == 1.0 and cover[0, 0] < 1.0 and cover.min() >= 0
    full = ray_coverage(RayTransform(Geometry.parallel2d(np.linspace(0, np.pi, 12, endpoint=False), (24, 24))))
    assert float(full.min()) == 1.0  # the default detector covers the whole square


def test_thread_governor_backs_off_when_steps_slow_down():
    from dipuq.threads import ThreadGovernor

    t = [0.0]
    gov = ThreadGovernor(window=10, factor=1.8, clock=lambda: t[0])
    n0 = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for step_s in [0.02] * 30 + [0.1] * 30:  # a neighbour arrives: steps 5x slower
            t[0] += step_s
            gov()
        assert gov.events and gov.events[0][1:3] == (2, 1) and torch.get_num_threads() == 1
        for _ in range(40):  # slow again at one thread: never below one
            t[0] += 1.0
            gov()
        assert torch.get_num_threads() == 1 and len(gov.events) == 1
    finally:
        torch.set_num_threads(n0)


def test_thread_governor_takes_a_freed_core_back_and_keeps_off_a_busy_one():
    from dipuq.threads import ThreadGovernor

    t, pace = [0.0], {1: 0.03, 2: 0.02}  # step seconds per thread count: the second core is free
    gov = ThreadGovernor(window=10, clock=lambda: t[0], ceiling=2, probe_every=50, probe_window=5)

    def steps(k):
        for _ in range(k):
            t[0] += pace[torch.get_num_threads()]
            gov()

    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps(49)
        assert torch.get_num_threads() == 1 and not gov.events  # no try before probe_every steps
        steps(10)  # the first window to end after 50 steps starts a try; 0.02 < 0.03 / 1.2: kept
        assert [e[:3] for e in gov.events] == [(51, 1, 2)] and torch.get_num_threads() == 2
        steps(300)
        assert torch.get_num_threads() == 2 and len(gov.events) == 1  # at the ceiling: no more tries

        gov = ThreadGovernor(window=10, clock=lambda: t[0], ceiling=2, probe_every=50, probe_window=5)
        torch.set_num_threads(1)
        pace[2] = 0.12  # a neighbour holds the other core: two threads oversubscribe
        steps(400)
        tries = [e for e in gov.events if e[1:3] == (1, 2)]
        backs = [e for e in gov.events if e[1:3] == (2, 1)]
        assert torch.get_num_threads() == 1 and len(tries) == len(backs) >= 2
        gaps = [b[0] - a[0] for a, b in zip(tries, tries[1:])]
        assert all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:]))  # each failed try doubles the wait
        assert len(tries) * 5 < 0.1 * 400  # oversubscribed steps stay a small share
    finally:
        torch.set_num_threads(n0)


def test_thread_governor_never_exceeds_the_callers_thread_count():
    from dipuq.threads import ThreadGovernor, thread_ceiling

    t = [0.0]
    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert thread_ceiling() == 1  # configure() never ran in the tests: the caller's count
        gov = ThreadGovernor(window=10, clock=lambda: t[0], probe_every=20)
        for _ in range(200):
            t[0] += 0.01
            gov()
        assert torch.get_num_threads() == 1 and not gov.events
    finally:
        torch.set_num_threads(n0)


def test_fixed_threads_pin_the_governors_ceiling_and_restore_it(monkeypatch):
    # the experiments fix torch's threads (a seed gives identical numbers): after the dipuq
    # command's configure() set the ceiling to every core, a fixed block must still keep the
    # governor from trying more threads than it was given
    from dipuq import threads

    monkeypatch.setattr(threads, "_CEILING", 2)
    n0 = torch.get_num_threads()
    with threads.fixed(1):
        assert torch.get_num_threads() == 1 and threads.thread_ceiling() == 1
        t = [0.0]
        gov = threads.ThreadGovernor(window=10, clock=lambda: t[0], probe_every=20)
        for _ in range(200):
            t[0] += 0.01
            gov()
        assert torch.get_num_threads() == 1 and not gov.events
    assert torch.get_num_threads() == n0 and threads.thread_ceiling() == 2


# -- the refit on every angle ------------------------------------------------------------------


def test_refit_on_every_angle_after_the_calibration(tmp_path, capsys):
    # the refit runs after the held-out angles have stopped the fit and calibrated the error bars:
    # everything up to the calibration, and the std maps, are those of the run without a refit;
    # the reconstruction is the refit's, which explains all angles (held-out ones included) better
    scan = _scan()
    cfg = load_config(None).replace({**TINY, "sampler.method": "cg", "refit.steps": 0})
    base = run_pipeline(scan, cfg, tmp_path / "r", seed=0, progress=False)
    assert base.metrics["refit_steps"] == 0 and "psnr_before_refit" not in base.metrics
    capsys.readouterr()
    refit = run_pipeline(scan, cfg.replace({"refit.steps": 40, "refit.ramp": 10}), tmp_path / "r", seed=0,
                         log=print)
    assert "continuing from 'refit'" in capsys.readouterr().out  # a rerun with a new refit reuses stages 1-7
    rec = json.loads((refit.run_dir / "stages" / "08_refit" / "refit.json").read_text())
    assert rec["refit"] is True and rec["steps"] == 40
    assert rec["misfit_all_after"] < rec["misfit_all_before"]
    np.testing.assert_array_equal(refit.std, base.std)  # the error bars of the held-out fit θ*
    assert not np.array_equal(refit.recon, base.recon)
    assert refit.metrics["psnr_before_refit"] == pytest.approx(base.metrics["psnr"], abs=1e-9)
    assert refit.metrics["psnr"] != base.metrics["psnr"] and refit.metrics["refit_steps"] == 40
    # a scan without held-out angles has nothing to add
    none = run_pipeline(scan, cfg.replace({"data.holdout": 0, "refit.steps": 40, "calibration.enabled": False}),
                        tmp_path / "n", seed=0, progress=False)
    rec = json.loads((none.run_dir / "stages" / "08_refit" / "refit.json").read_text())
    assert rec == {"refit": False, "reason": "no held-out angles: the DIP fit saw every angle"}


def test_warm_refit_continues_from_the_current_weights():
    # warm = True: no warm-up and no re-anchoring, the first iterate is the network as it was
    _, A, _, y, _ = _fit_setup()
    z = torch.ones(1, 1, *A.domain_shape)
    net = _net()
    run_dip(net, A, y, DipConfig(iterations=20, lr=3e-3, gamma=0.0, stop="none", warmup=5), x_input=z)
    with torch.no_grad():
        start = net(z).reshape(A.domain_shape).clone()
    res = run_dip(net, A, y, DipConfig(iterations=3, lr=3e-3, gamma=0.0, stop="none", warmup=50, lr_ramp=3),
                  x_input=z, warm=True)
    with torch.no_grad():
        first = float((A(start) - y).square().mean())
    assert res.history["misfit"][0] == pytest.approx(first, rel=1e-6)
    with pytest.raises(Exception, match="needs the network input"):
        run_dip(net, A, y, DipConfig(iterations=3, stop="none"), warm=True)
