"""Benchmark: posterior samplers (sgd, cg, exact) against the DIP fit, in 2D and 3D.

Each case runs dipuq's own pipeline up to the posterior (held-out angles, DIP fit at its default
validation stop, linearisation, g from the fitted weights as in the demos), then times every
sampler setting on that posterior, each paying for its own preconditioner (built once per set of
preconditioner settings; its measured time is added to every setting that shares it):

- ``2d``: 64² Shepp–Logan, parallel beam, 30 views, 1 % noise; reference = the exact posterior std
  (dense Cholesky); "MC floor" = the exact sampler on the same chains (pure Monte Carlo error).
- ``3d``: 32³ Shepp–Logan, cone beam, 20 views, 2 % noise (the demo's geometry at 32³); no dense
  reference fits in memory, so the reference is the same chains solved to a relative residual of
  1e-4 (cg, continued from the timed block-cg 1e-3 row, not counted): the error column is then the solver's error alone,
  and the total error is estimated as √(MC² + solver²) with the Gaussian MC error of a K-sample std
  (0.6745/√(2K): 0.084 at K = 32; the 2D case measures 0.086).

Columns: K-products = vectors pushed through K = g·AJ̃J̃ᵀAᵀ (or H) including the Nyström sketch;
"floor" = the Krylov floor ½√κ·ln(2/ε) at ε = 1e-3 for κ of the Nyström-preconditioned dual system
(``CGSampler.condition_number``: Lanczos from 60 PCG steps), iters/floor how far a setting is from it. The summary
prints (uncertainty time)/(DIP fit time) for the cheapest setting at ≤ 10 % median std error, where
uncertainty time = linearisation (g-prior probes) + preconditioner + sampling, and the sgd/cg ratio.

Run:  python benchmarks/samplers.py [--cases 2d,3d] [--threads 2] [--samples 32] [--quick]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch

from dipuq.data.phantoms import shepp_logan
from dipuq.geometry import Geometry
from dipuq.operators.simulate import simulate_scan
from dipuq.run.config import Config
from dipuq.run.context import RunContext
from dipuq.run.pipeline import run_pipeline
from dipuq.run.rundir import RunDir
from dipuq.run.stages import STAGE_NAMES, loaders
from dipuq.samplers import SamplerConfig, make_sampler
from dipuq.samplers.nystrom import krylov_iterations

REF_TOL = 1e-4  # 3D reference residual: std maps at 1e-3 are within ~2 % of 1e-6 ones (2D, measured)
MC_GAUSS = 0.6745 / math.sqrt(2.0)  # median |relative error| of a K-sample std is MC_GAUSS / √K


def make_case(name: str):
    """(scan, pipeline overrides) of a benchmark case."""
    if name == "2d":
        geom = Geometry.parallel2d(np.linspace(0, np.pi, 30, endpoint=False), (64, 64))
        scan = simulate_scan(shepp_logan((64, 64)), geom, noise="gaussian", noise_level=0.01,
                             generator=torch.Generator().manual_seed(1), name="2D Shepp-Logan 64², 30 views")
        net = {"dip.network.scales": 3, "dip.network.channels": [8, 16, 16], "dip.network.skip_channels": 2,
               "dip.lr": 1e-2}
    else:
        n = 32
        geom = Geometry.cone3d(np.linspace(0, 2 * np.pi, 20, endpoint=False), (n, n, n),
                               det_shape=(int(1.25 * n), int(1.5 * n)), source_origin=4.0 * n,
                               origin_detector=2.0 * n, det_spacing=1.5)
        scan = simulate_scan(shepp_logan((n, n, n)), geom, noise="gaussian", noise_level=0.02,
                             generator=torch.Generator().manual_seed(2), name="3D Shepp-Logan 32³, cone, 20 views")
        net = {"dip.network.scales": 3, "dip.network.channels": 8, "dip.network.skip_channels": 2,
               "dip.lr": 3e-3}
    # the pipeline's own sampler stage is not what is measured: one sgd step without a preconditioner
    over = {**net, "posterior.em_rounds": 0, "sampler.method": "sgd", "sampler.n_samples": 1,
            "sampler.n_steps": 1, "sampler.precond_rank": 0, "sampler.lr": 1e-12, "refit.steps": 0,
            "calibration.enabled": False, "output.figures": False, "output.report": False, "output.tiff": False}
    return scan, over


def fit_case(name: str, folder: str):
    """Run the pipeline on the case; returns (posterior, DIP seconds, DIP iterations, linearise seconds)."""
    scan, over = make_case(name)
    cfg = Config().replace(over)
    res = run_pipeline(scan, cfg, folder, seed=0, device="cpu", progress=False)
    ctx = RunContext(RunDir(folder, STAGE_NAMES), cfg, 0, torch.device("cpu"), False, loaders=loaders())
    dip = ctx["dip"]
    return ctx["posterior"], res.timings["dip"], dip, res.timings["linearise"]


#: preconditioners already built, per (sampler, preconditioner settings): (cache entries, seconds)
_PREPARED: dict[tuple, tuple[dict, float]] = {}


def _solver_entries(post) -> list:
    """The posterior's cache keys a sampler's preparation made (not the exact sampler's dense set-up)."""
    return [k for k in post.cache if k != "dense" and not (isinstance(k, tuple) and k[0] == "chol")]


def prepared(post, name: str, cfg: SamplerConfig):
    """The sampler with its preconditioner ready and the seconds that preconditioner cost (built
    once per (sampler, preconditioner settings), replayed from the cache afterwards)."""
    for key in _solver_entries(post):
        del post.cache[key]
    sampler = make_sampler(name, cfg)
    pkey = (name, post.g, post.sigma2, *(getattr(cfg, k) for k in sampler.keys if k.startswith("precond")),
            *((cfg.power_iters, cfg.lr, cfg.lr_factor) if name == "sgd" else ()))
    if pkey in _PREPARED:
        entries, t_prep = _PREPARED[pkey]
        post.cache.update(entries)
    else:
        t0 = time.perf_counter()
        sampler.prepare(post)
        t_prep = time.perf_counter() - t0
        _PREPARED[pkey] = ({k: post.cache[k] for k in _solver_entries(post)}, t_prep)
    return sampler, t_prep


def run_setting(post, name: str, cfg: SamplerConfig, K: int, seed: int = 1, init=None):
    """Time one sampler setting; returns (result, seconds, K-products, rank, iterations).

    Every setting pays for its preconditioner (sketch and, for sgd, step size): built once per
    (sampler, preconditioner settings) and its measured time added to each setting that uses it,
    so that settings which differ only in their solve do not rebuild the same sketch (in 3D a
    rank-2048 sketch costs minutes)."""
    sampler, t_prep = prepared(post, name, cfg)
    t0 = time.perf_counter()
    res = sampler.sample(post, K, seed=seed, keep_z=True, keep_warm=True, init=init)
    secs = t_prep + time.perf_counter() - t0
    info = sampler.describe(post)
    rank = int(info.get("precond_rank", 0))
    sketch = rank * (1 + cfg.precond_power_iters)
    batches = math.ceil(K / cfg.chains_per_batch)
    iters = res.steps // max(batches, 1)
    products = sketch + (K * iters if name != "exact" else 0)
    return res, secs, products, rank, iters


def settings_for(case: str, quick: bool, K: int):
    b = min(K, 16)
    rows = []
    if case == "2d":
        rows.append(("exact", SamplerConfig(chains_per_batch=b), "dense Cholesky"))
    rows.append(("sgd", SamplerConfig(n_steps=150, chains_per_batch=b, precond_max_rank=256, grad_tol=0),
                 "150 steps, rank 256"))
    if case == "2d":  # block cg wins in 2D (61 vs 88 iterations): in 3D only the block form is timed
        rows.append(("cg", SamplerConfig(cg_tol=1e-3, chains_per_batch=b, cg_block=False), "tol 1e-3, one space per chain"))
    rows += [
        ("cg", SamplerConfig(cg_tol=1e-3, chains_per_batch=b), "tol 1e-3, block"),
        ("cg", SamplerConfig(cg_tol=3e-3, chains_per_batch=b), "tol 3e-3, block"),
    ]
    if case == "2d":  # in 3D each of these costs minutes (sgd's default stop runs to its 1000-step cap)
        rows += [
            ("sgd", SamplerConfig(n_steps=300, chains_per_batch=b, precond_max_rank=1024, grad_tol=0),
             "300 steps, rank 1024"),
            ("cg", SamplerConfig(cg_tol=1e-2, chains_per_batch=b), "tol 1e-2, block"),
        ]
    if not quick:
        rows += [
            ("sgd", SamplerConfig(chains_per_batch=b), "defaults (tol 0.01, adaptive)"),
            ("cg", SamplerConfig(cg_tol=1e-3, chains_per_batch=b, precond_power_iters=1), "tol 1e-3, block, 1 power it."),
            ("cg", SamplerConfig(cg_tol=1e-3, chains_per_batch=b, precond_max_rank=512), "tol 1e-3, block, rank <= 512"),
        ]
    return rows


def bench_case(case: str, args) -> list[tuple]:
    K = args.samples
    if args.workdir:  # kept (and resumed: the DIP times are then those recorded by the first run)
        post, t_dip, dip, t_lin = fit_case(case, f"{args.workdir}/{case}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            post, t_dip, dip, t_lin = fit_case(case, tmp)
    print(f"\n=== case {case}: m = {post.m} (fitted rays), p = {post.p} conv weights, d = {post.d} voxels")
    print(f"DIP fit (default validation stop, dip.iterations cap 2000): "
          f"{dip.iterations} iterations, kept {dip.best_iteration}, stop reason {dip.stop_reason!r}, {t_dip:.1f} s; "
          f"linearise (g-prior probes) {t_lin:.1f} s; g = {post.g:.4g}, sigma2 = {post.sigma2:.4g}")
    mc_gauss = MC_GAUSS / math.sqrt(K)
    if case == "2d":
        ex = make_sampler("exact")
        t0 = time.perf_counter()
        ref_std = ex.image_variance(post).sqrt()
        print(f"reference: exact posterior std (dense set-up {time.perf_counter() - t0:.1f} s)")
        floor_res, _, _, _, _ = run_setting(post, "exact", SamplerConfig(chains_per_batch=min(K, 16)), K)
        floor = float(((floor_res.moments.std() - ref_std).abs() / ref_std).median())
    else:
        ref_std, floor = None, 0.0  # the 3D reference is solved after the rows, from the block-cg 1e-3 row
    t0 = time.perf_counter()
    cg, _ = prepared(post, "cg", SamplerConfig(chains_per_batch=1))  # the block-cg rows' preconditioner
    kappa = cg.condition_number(post)
    kfloor = math.ceil(krylov_iterations(kappa, 1e-3))
    print(f"preconditioned dual κ (Lanczos, adaptive rank): {kappa:.3g}; Krylov floor at 1e-3: {kfloor} iterations "
          f"({time.perf_counter() - t0:.1f} s)")
    hdr = (f"{'sampler':7s} {'setting':30s} {'K':>3s} {'rank':>5s} {'iters':>6s} {'iters/floor':>11s} "
           f"{'K-products':>10s} {'med.err':>8s} {'total err':>9s} {'wall s':>7s} {'(UQ)/DIP':>8s}")
    print(hdr)
    print("-" * len(hdr))
    measured = []
    for name, cfg, desc in settings_for(case, args.quick, K):
        res, secs, products, rank, iters = run_setting(post, name, cfg, K)
        measured.append((name, cfg, desc, res, secs, products, rank, iters))
        if ref_std is not None:
            _print_row(case, K, measured[-1], ref_std, t_lin, t_dip, kfloor, mc_gauss)
    if ref_std is None:  # 3D: continue the block-cg 1e-3 row's chains to REF_TOL (not timed)
        t0 = time.perf_counter()
        start = next(m[3] for m in measured if m[0] == "cg" and m[1].cg_block and m[1].cg_tol == 1e-3)
        ref, _, _, _, _ = run_setting(post, "cg", SamplerConfig(cg_tol=REF_TOL, cg_max_iter=3000,
                                                                chains_per_batch=min(K, 16)), K, init=start.warm)
        ref_std = ref.moments.std()
        print(f"reference: the same {K} chains continued to {REF_TOL:g} ({time.perf_counter() - t0:.1f} s, not "
              f"counted); Gaussian MC error of a {K}-sample std: {mc_gauss:.3f}")
        for m in measured:
            _print_row(case, K, m, ref_std, t_lin, t_dip, kfloor, mc_gauss)
    if case == "2d":
        print(f"MC floor (exact sampler, same chains): {floor:.4f}")
    return [_row(case, m, ref_std, t_lin, t_dip, kfloor, mc_gauss) for m in measured]


def _row(case, m, ref_std, t_lin, t_dip, kfloor, mc_gauss):
    name, _, desc, res, secs, _, _, iters = m
    err = float(((res.moments.std() - ref_std).abs() / ref_std).median())
    total = err if case == "2d" else math.hypot(mc_gauss, err)
    return case, name, desc, total, secs, (t_lin + secs) / t_dip, iters, kfloor, err


def _print_row(case, K, m, ref_std, t_lin, t_dip, kfloor, mc_gauss):
    name, _, desc, _, secs, products, rank, iters = m
    _, _, _, total, _, ratio, _, _, err = _row(case, m, ref_std, t_lin, t_dip, kfloor, mc_gauss)
    far = "" if name == "exact" else f"{iters / kfloor:11.2f}"
    print(f"{name:7s} {desc:30s} {K:3d} {rank:5d} {iters:6d} {far:>11s} {products:10d} {err:8.4f} {total:9.4f} "
          f"{secs:7.1f} {ratio:8.2f}", flush=True)


def summary(rows, t_note: str) -> None:
    print(f"\n=== summary ({t_note}): cheapest setting at <= 10 % median std error")
    for case in sorted({r[0] for r in rows}):
        best = {}
        for name in ("sgd", "cg", "exact"):
            ok = [r for r in rows if r[0] == case and r[1] == name and r[3] <= 0.10]
            if ok:
                best[name] = min(ok, key=lambda r: r[4])
                _, n, d, e, s, ratio, it, kf, _ = best[name]
                print(f"{case} {n:5s}: {d} (err {e:.3f}, {it} iterations = {it / kf:.2f}x the Krylov floor): "
                      f"{s:.1f} s; (uncertainty time)/(DIP fit time) = {ratio:.2f}")
            else:
                print(f"{case} {name:5s}: no setting reached 10 % median std error")
        if "sgd" in best and "cg" in best:
            print(f"{case} sgd/cg time at equal accuracy: {best['sgd'][4] / best['cg'][4]:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="2d,3d", help="comma-separated: 2d, 3d")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32, help="K, posterior samples per setting")
    ap.add_argument("--quick", action="store_true", help="fewer settings")
    ap.add_argument("--workdir", help="keep each case's pipeline run here (a rerun reuses its DIP fit)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases.split(","):
        if case not in ("2d", "3d"):
            ap.error(f"unknown case {case!r}: use 2d and/or 3d")
        rows += bench_case(case, args)
    summary(rows, f"{args.threads} threads")


if __name__ == "__main__":
    main()
