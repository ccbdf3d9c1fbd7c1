"""Benchmark: posterior samples per second with 1 vs W processes (torch.distributed).

A 2D 64² linearised-DIP problem (small U-Net with GroupNorm at a fixed random θ*, parallel-beam
RayTransform with 30 angles, or a random sparse matrix when the operators are unavailable) is
sampled with the ``sgd`` sampler under ``torchrun --nproc_per_node W``; each process uses one
thread. Rank r solves every W-th chain; the timed part is ``sample_distributed`` from a barrier
to the all-reduced moments (problem set-up and the λmax power iteration are excluded and
identical on every rank). Printed: samples/s per setting and the scaling ratio
(samples/s with W processes) / (samples/s with 1). Throughput per sample does not depend on the
DIP fit, so θ* is the network at initialisation.

CPU section: 1 and 2 processes on gloo. GPU section (when CUDA is available): 1 process and, with
several GPUs, one process per GPU on NCCL.

Run:  python benchmarks/distributed.py [--size 64] [--samples 32] [--steps 100] [--procs 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import torch


def build_posterior(n: int, n_angles: int, device: torch.device):
    """(Posterior, description) for an n×n parallel-beam problem; identical on every rank."""
    from dipuq.posterior.linearise import LinearisedModel
    from dipuq.dip.networks import UNet
    from dipuq.posterior.model import Posterior

    gen = torch.Generator().manual_seed(0)
    try:
        from dipuq.geometry import Geometry
        from dipuq.operators import RayTransform

        A = RayTransform(Geometry.parallel2d(np.linspace(0, np.pi, n_angles, endpoint=False), (n, n)), device=device)
        desc = f"RayTransform parallel2d ({A.backend})"
    except Exception as exc:  # noqa: BLE001 - operators not ready: random sparse fallback
        from dipuq.operators.base import MatrixOperator

        m = n_angles * int(n * 1.45)
        M = torch.randn(m, n * n, generator=gen) * (torch.rand(m, n * n, generator=gen) < 0.02)
        A = MatrixOperator(M.to_sparse_csr().to(device), (n, n), (m,))
        desc = f"random sparse matrix ({exc.__class__.__name__})"
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    x = ((yy / 0.8) ** 2 + (xx / 0.6) ** 2 <= 1).float().to(device)
    with torch.no_grad():
        ax = A(x)
    noise = 0.01 * float(ax.abs().max())
    y = ax + noise * torch.randn(ax.shape, generator=gen).to(device)
    net = UNet(ndim=2, scales=3, channels=(8, 16, 16), skip_channels=2, groupnorm=4, generator=gen).to(device)
    z = (0.1 * torch.randn(1, 1, n, n, generator=gen)).to(device)
    model = LinearisedModel(net, z, A)
    post = Posterior(model, A, y, sigma2=noise**2, g=1e-3, n_probes=32,
                     generator=torch.Generator(device=device).manual_seed(1))
    return post, f"{n}x{n} image, {desc}, m = {A.shape[0]}, p = {model.p} conv weights"


def worker(args) -> None:
    """One rank: build, warm up, time ``sample_distributed``; rank 0 prints a JSON line."""
    from dipuq.samplers.distributed import sample_distributed
    from dipuq.samplers.ranks import init_distributed
    from dipuq.samplers import SamplerConfig, make_sampler

    torch.set_num_threads(args.threads)
    with init_distributed(device=args.device, timeout_s=600) as dctx:
        post, desc = build_posterior(args.size, args.angles, dctx.device)
        sampler = make_sampler("sgd", SamplerConfig(n_steps=args.steps, chains_per_batch=args.chains_per_batch))
        sampler.prepare(post)  # λmax by power iteration: set-up, not sampling
        # warm-up (first-call costs of vmap/linearize and the process group) on chains not timed
        sample_distributed(sampler, post, seed=1, ctx=dctx, chains=range(10**6, 10**6 + dctx.world_size))
        dctx.barrier()
        if dctx.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = sample_distributed(sampler, post, args.samples, seed=0, ctx=dctx)
        if dctx.device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        if dctx.is_main:
            print("RESULT " + json.dumps({
                "world": dctx.world_size, "backend": dctx.backend or "none (single process)",
                "device": str(dctx.device), "samples": res.moments.n, "seconds": secs,
                "samples_per_s": res.moments.n / secs, "rank_seconds": res.rank_seconds,
                "std_mean": float(res.moments.std().mean()), "problem": desc,
            }), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args, device: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), os.path.abspath(__file__), "--worker",
           "--device", device, "--size", str(args.size), "--angles", str(args.angles), "--samples", str(args.samples),
           "--steps", str(args.steps), "--chains-per-batch", str(args.chains_per_batch), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{world}-process run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][7:])


def section(title: str, worlds, args, device: str) -> None:
    print(f"\n== {title} ==")
    base = None
    for w in worlds:
        r = launch(w, args, device)
        if base is None:
            print(f"problem: {r['problem']}; sgd {args.steps} steps, {args.chains_per_batch} chains per batch, "
                  f"{args.samples} samples, {args.threads} thread(s) per process")
            base = r
        ratio = r["samples_per_s"] / base["samples_per_s"]
        spread = ", ".join(f"{s:.2f}" for s in r["rank_seconds"])
        print(f"{w} process(es) [{r['backend']}, {r['device']}]: {r['samples']} samples in {r['seconds']:.2f} s "
              f"= {r['samples_per_s']:.2f} samples/s; scaling x{ratio:.2f} (ideal x{w / worlds[0]:.0f}); "
              f"per-rank sampling s: {spread}; mean std {r['std_mean']:.5g}")
        if not math.isclose(r["std_mean"], base["std_mean"], rel_tol=1e-5):
            print(f"  WARNING: mean std differs from the {worlds[0]}-process run ({base['std_mean']:.8g})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--angles", type=int, default=30)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--chains-per-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="CPU process counts to compare")
    ap.add_argument("--gpu-samples", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-cpu", action="store_true", help="GPU section only")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    print(f"host {socket.gethostname()}: {os.cpu_count()} CPU cores, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}; torch {torch.__version__}")
    if not args.no_cpu:
        section("CPU, gloo", args.procs, args, "cpu")
    if torch.cuda.is_available():
        n_gpu = torch.cuda.device_count()
        worlds = [1] + ([n_gpu] if n_gpu > 1 else [])
        args.samples = args.gpu_samples
        args.chains_per_batch = max(args.chains_per_batch, 32)
        section(f"GPU, NCCL ({n_gpu} x {torch.cuda.get_device_name(0)})", worlds, args, "cuda")
        if n_gpu == 1:
            print("one GPU: multi-GPU scaling needs >= 2 GPUs (NCCL runs one process per GPU)")
    else:
        print("\n(no CUDA device: GPU section skipped)")


if __name__ == "__main__":
    main()
