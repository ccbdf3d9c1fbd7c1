"""Benchmark: posterior samplers (sgd, cg, exact) on a 2D 64² linearised-DIP problem.

Fits a small U-Net DIP to a simulated sparse-angle parallel-beam scan, linearises it, sets g to
the exact evidence maximiser, and compares each sampler's std map with the exact posterior std:
median relative error against cost (network JVP/VJP and operator applications, wall time).
Finally reports (uncertainty time) / (DIP fit time) for the cheapest setting reaching a 10 %
median std error (with the exact reference it is pure Monte Carlo error ≈ 0.67/sqrt(2K)).

Run:  python benchmarks/samplers.py [--size 64] [--angles 30] [--dip-iters 1000] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from dipuq.operators.base import LinearOperator
from dipuq.posterior.linearise import LinearisedModel
from dipuq.posterior.model import Posterior
from dipuq.samplers import SamplerConfig, make_sampler


def phantom(n: int) -> torch.Tensor:
    """A few ellipses on [−1, 1]² (a Shepp–Logan-like test image)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    x = torch.zeros(n, n)
    for cy, cx, ay, ax, v in [(0, 0, 0.85, 0.65, 1.0), (0, 0, 0.75, 0.55, -0.6), (-0.2, -0.2, 0.2, 0.15, 0.4),
                              (0.25, 0.15, 0.15, 0.25, 0.3), (0.5, -0.1, 0.08, 0.08, 0.5)]:
        x[((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1] += v
    return x


def build_operator(n: int, n_angles: int):
    try:
        from dipuq.geometry import Geometry
        from dipuq.operators import RayTransform

        A = RayTransform(Geometry.parallel2d(np.linspace(0, np.pi, n_angles, endpoint=False), (n, n)))
        return A, f"RayTransform parallel2d ({A.backend})"
    except Exception as exc:  # noqa: BLE001 - operators not ready: random sparse fallback
        from dipuq.operators.base import MatrixOperator

        gen = torch.Generator().manual_seed(0)
        m = n_angles * int(n * 1.45)
        M = torch.randn(m, n * n, generator=gen) * (torch.rand(m, n * n, generator=gen) < 0.02)
        return MatrixOperator(M.to_sparse_csr(), (n, n), (m,)), f"random sparse matrix ({exc.__class__.__name__})"


def fit_dip(A, y, n, iters, gen):
    """DIP fit with dipuq.dip.driver.run_dip if available, else plain Adam on ||A f(θ) − y||²; returns (net, z, secs)."""
    from dipuq.dip.networks import UNet

    net = UNet(ndim=2, scales=3, channels=(8, 16, 16), skip_channels=2, groupnorm=4, generator=gen)
    t0 = time.perf_counter()
    try:
        from dipuq.dip.driver import run_dip
        from dipuq.dip.fit import DipConfig

        res = run_dip(net, A, y, DipConfig(iterations=iters, lr=1e-2, gamma=1e-4), generator=gen)
        net = res.build_net()
        z = res.net_input
        how = "dipuq.dip.driver.run_dip"
    except Exception as exc:  # noqa: BLE001
        z = torch.randn(1, 1, n, n, generator=gen) * 0.1
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(iters):
            opt.zero_grad()
            loss = (A(net(z)[0, 0]) - y).pow(2).sum()
            loss.backward()
            opt.step()
        how = f"plain Adam ({exc.__class__.__name__}: {exc})"
    return net, z, time.perf_counter() - t0, how


class CountedOperator(LinearOperator):
    """``A`` itself, counting the single vectors pushed through A (``n_A``) and Aᵀ (``n_AT``)."""

    def __init__(self, A):
        self.A, self.n_A, self.n_AT = A, 0, 0
        self.domain_shape, self.range_shape, self.dtype, self.device = A.domain_shape, A.range_shape, A.dtype, A.device

    def _apply(self, x):
        self.n_A += x.shape[0]
        return self.A._raw(x, False)

    def _adjoint(self, y):
        self.n_AT += y.shape[0]
        return self.A._raw(y, True)

    def as_matrix(self, dtype=None):
        return self.A.as_matrix(dtype)


def run_one(post, name, cfg, K, seed=1):
    model = post.model
    model.n_jvp = model.n_vjp = 0
    post.A.n_A = post.A.n_AT = 0
    for key in [k for k in post.cache if k != "dense" and not (isinstance(k, tuple) and k[0] == "chol")]:
        del post.cache[key]  # each run pays for its own preconditioner and step-size estimate
    sampler = make_sampler(name, cfg)
    t0 = time.perf_counter()
    sampler.prepare(post)
    res = sampler.sample(post, K, seed=seed)
    secs = time.perf_counter() - t0
    res.solver = sampler.describe(post)  # preconditioner rank actually used (adaptive)
    return res, secs, (model.n_jvp, model.n_vjp, post.A.n_A, post.A.n_AT)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--angles", type=int, default=30)
    ap.add_argument("--dip-iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer settings")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n = args.size
    A, a_desc = build_operator(n, args.angles)
    x_true = phantom(n)
    with torch.no_grad():
        ax = A(x_true)
    noise = 0.01 * float(ax.abs().max())
    y = ax + noise * torch.randn(ax.shape, generator=gen)
    net, z, t_dip, how = fit_dip(A, y, n, args.dip_iters, gen)
    model = LinearisedModel(net, z, A)
    with torch.no_grad():
        psnr = 10 * math.log10(float(x_true.max() - x_true.min()) ** 2 / float((model.mean - x_true).pow(2).mean()))
    print(f"problem: {n}x{n} image, operator {a_desc}, m = {A.shape[0]}, p = {model.p} conv weights")
    print(f"DIP fit: {args.dip_iters} iterations in {t_dip:.1f} s via {how}; PSNR {psnr:.2f} dB")

    t0 = time.perf_counter()
    post = Posterior(model, CountedOperator(A), y, sigma2=noise**2, g=1.0, n_probes=128, generator=gen)
    t_scale = time.perf_counter() - t0
    ex = make_sampler("exact")
    t0 = time.perf_counter()
    ex.dense(post)
    from scipy.optimize import minimize_scalar

    opt = minimize_scalar(lambda lg: -ex.log_evidence(post, math.exp(lg)), bounds=(-30, 5), method="bounded",
                          options={"xatol": 1e-3})
    post = post.with_g(math.exp(opt.x))
    std_ref = ex.image_variance(post).sqrt()
    t_exact_setup = time.perf_counter() - t0
    print(f"g-prior scales (128 probes): {t_scale:.1f} s; exact setup (dense J̃, AJ̃, evidence argmax, "
          f"variance): {t_exact_setup:.1f} s; g* = {post.g:.4g}, sigma2 = {post.sigma2:.4g}")

    # J / Jᵀ batching: vmap vs a Python loop over chains (16 vectors)
    v = torch.randn(16, model.p, generator=gen)
    u = torch.randn(16, *model.image_shape, generator=gen)
    for mode in ("vmap", "loop"):
        model.batching = mode
        model.jvp(v), model.vjp(u)
        t0 = time.perf_counter()
        for _ in range(5):
            model.jvp(v)
        t1 = time.perf_counter()
        for _ in range(5):
            model.vjp(u)
        t2 = time.perf_counter()
        print(f"batching {mode:5s}: J v {1e3 * (t1 - t0) / 80:.2f} ms/vector, Jᵀ u {1e3 * (t2 - t1) / 80:.2f} ms/vector")
    model.batching = "vmap"

    settings = []
    for K in ([32] if args.quick else [32, 128]):
        settings.append(("exact", SamplerConfig(), K, "dense Cholesky"))
    settings.append(("sgd", SamplerConfig(n_steps=300, chains_per_batch=32, precond_rank=0, grad_tol=0), 32,
                     "300 steps, no precond"))
    for T in ([50, 150] if args.quick else [50, 150, 300]):  # the fixed rank-256 preconditioner of 0.1
        settings.append(("sgd", SamplerConfig(n_steps=T, chains_per_batch=32, precond_max_rank=256, grad_tol=0), 32,
                         f"{T} steps, rank 256 fixed"))
    settings.append(("sgd", SamplerConfig(chains_per_batch=32), 32, "defaults (tol 0.01, adapt.)"))
    settings.append(("sgd", SamplerConfig(chains_per_batch=32, grad_tol=0.03), 32, "tol 0.03, adaptive rank"))
    if not args.quick:
        settings.append(("sgd", SamplerConfig(n_steps=150, chains_per_batch=32, average_from=0.5, precond_max_rank=256,
                                              grad_tol=0), 32, "150 steps, avg 1/2"))
        settings.append(("sgd", SamplerConfig(n_steps=150, chains_per_batch=32, lr_decay="cosine", precond_max_rank=256,
                                              grad_tol=0), 32, "150 steps, cosine"))
    for tol in [1e-2, 1e-3]:
        settings.append(("cg", SamplerConfig(cg_tol=tol, chains_per_batch=32), 32, f"tol {tol:g}, adaptive rank"))
    settings.append(("cg", SamplerConfig(cg_tol=1e-3, precond_rank=0, chains_per_batch=32), 32, "tol 0.001, no precond"))
    # subspace iterations in the Nyström sketch (sampler.precond_power_iters): sketch costs 2x per rank
    settings.append(("cg", SamplerConfig(cg_tol=1e-3, chains_per_batch=32, precond_power_iters=1), 32,
                     "tol 0.001, adaptive, 1 power it."))
    settings.append(("sgd", SamplerConfig(chains_per_batch=32, precond_power_iters=1), 32, "defaults, 1 power it."))
    if not args.quick:
        settings.append(("sgd", SamplerConfig(chains_per_batch=32), 128, "defaults (tol 0.01, adapt.)"))
        settings.append(("cg", SamplerConfig(cg_tol=1e-3, chains_per_batch=32), 128, "tol 0.001, adaptive rank"))

    # the same chains through the exact solver: the Monte Carlo floor for each K
    floor = {}
    rows = []
    hdr = (f"{'sampler':8s} {'setting':28s} {'K':>4s} {'rank':>5s} {'med.rel.err':>11s} {'MC floor':>8s} {'iters':>6s} "
           f"{'JVPs':>7s} {'VJPs':>7s} {'A':>7s} {'AT':>7s} {'wall s':>7s} {'samples/s':>9s}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for name, cfg, K, desc in settings:
        if K not in floor:
            r, _, _ = run_one(post, "exact", SamplerConfig(), K)
            floor[K] = float(((r.moments.std() - std_ref).abs() / std_ref).median())
        res, secs, (nj, nv, na, nat) = run_one(post, name, cfg, K)
        err = float(((res.moments.std() - std_ref).abs() / std_ref).median())
        iters = res.steps // max(1, math.ceil(K / cfg.chains_per_batch))
        rows.append((name, desc, K, err, secs))
        rank = getattr(res, "solver", {}).get("precond_rank", 0)
        print(f"{name:8s} {desc:28s} {K:4d} {rank:5d} {err:11.4f} {floor[K]:8.4f} {iters:6d} {nj:7d} {nv:7d} {na:7d} {nat:7d} "
              f"{secs:7.2f} {K / secs:9.1f}")
    print()
    print(f"DIP fit time: {t_dip:.1f} s ({args.dip_iters} iterations)")
    for name in ("sgd", "cg", "exact"):
        ok = [(s, d, K, e) for nm, d, K, e, s in rows if nm == name and e <= 0.10]
        if ok:
            s, d, K, e = min(ok)
            extra = t_scale if name != "exact" else t_exact_setup
            print(f"{name:5s}: cheapest setting at <= 10 % median std error: {d}, K = {K} ({e:.3f}): "
                  f"{s:.1f} s sampling (+{extra:.1f} s {'g-prior scales' if name != 'exact' else 'dense setup'}); "
                  f"uncertainty/DIP time = {(s + extra) / t_dip:.2f}")
        else:
            print(f"{name:5s}: no setting reached 10 % median std error")


if __name__ == "__main__":
    main()
