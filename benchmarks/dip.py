"""Benchmark one DIP iteration against its floor, measured in the same run.

    python benchmarks/dip.py [--quick] [--threads N] [--iters N]

The floor of a DIP iteration is the unavoidable work: one network forward + backward, one A
(forward) and one Aᵀ (in the backward pass) — timed as ``loss = mean((A f(z) − y)²);
loss.backward()``. A DIP iteration (:func:`dipuq.dip.fit.fit_dip`) adds the TV term, Adam's update,
the best-iterate snapshot and the bookkeeping; the target is overhead ≤ 10 %.

Cases: 2D 128² (60 angles) and 3D 32³ (parallel, 32 angles) on CPU; 3D 128³ (cone, 128 views)
on a GPU when ASTRA CUDA is usable. Each case runs in a fresh subprocess so that its peak resident
memory (``resource.ru_maxrss``) is its own; on the GPU the peak is
``torch.cuda.max_memory_allocated``. Floor steps and DIP iterations alternate one by one (so both
see the same machine load) and the medians of the per-step times are compared.

Then the 3D U-Net, the network configuration before issue #11 point 6 ("old": ``channels=32``,
``fast_conv=False``, ``channels_last=False``) side by side with today's defaults ("new":
``channels=0`` = 16 at full resolution and 32 below, ``fast_conv``, ``channels_last``), both 4
scales and 4 skip channels, the same seed: forward + backward ms per step at 32³ and 64³ (steps
alternate old/new, medians), and a DIP fit of each on the simulated cone-beam scan of
``dipuq demo`` at 32³ (20 views, 2 % noise; ``--fit-iters`` Adam steps each, iterations of the two
fits alternating) with the PSNR of the kept (lowest-loss) iterate and the best PSNR on the way.
``--unet-only`` runs just this part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

CASES = {
    # name: (ndim, vol, angles, beam, network channels, scales, device)
    "2d-128": (2, (128, 128), 60, "parallel", 32, 4, "cpu"),
    "3d-32": (3, (32, 32, 32), 32, "parallel", 16, 3, "cpu"),
    "3d-128-gpu": (3, (128, 128, 128), 128, "cone", 32, 4, "cuda"),
}


def build_case(name: str):
    from dipuq.data.phantoms import shepp_logan
    from dipuq.dip.fit import DipConfig, make_input
    from dipuq.dip.networks import NetworkConfig, UNet
    from dipuq.geometry import Geometry
    from dipuq.operators import RayTransform, simulate_scan

    ndim, vol, n_ang, beam, ch, scales, device = CASES[name]
    angles = np.linspace(0, np.pi if beam == "parallel" else 2 * np.pi, n_ang, endpoint=False)
    if ndim == 2:
        geo = Geometry.parallel2d(angles, vol)
    elif beam == "parallel":
        geo = Geometry.parallel3d(angles, vol)
    else:
        n = vol[0]
        geo = Geometry.cone3d(angles, vol, (n, int(n * 1.5)), source_origin=4.0 * n, origin_detector=2.0 * n)
    A = RayTransform(geo, backend="astra-cuda" if device == "cuda" else "auto")
    scan = simulate_scan(shepp_logan(vol), geo, operator=A, noise_level=0.05,
                         generator=torch.Generator().manual_seed(0))
    y = torch.as_tensor(scan.projections, device=A.device)
    cfg = DipConfig(iterations=10**6, lr=1e-3, gamma=1e-2, input="fbp",
                    network=NetworkConfig(scales=scales, channels=ch, skip_channels=4))
    g = torch.Generator().manual_seed(0)
    net = UNet.from_config(cfg.network, ndim, generator=g).to(A.device)
    z = make_input(A, y, cfg, g)
    return A, y, net, z, cfg, g


def run_case(name: str, iters: int, rounds: int) -> dict:
    from dipuq.dip.fit import fit_dip

    A, y, net, z, cfg, g = build_case(name)
    cuda = A.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def floor_step():
        x = net(z).reshape(A.domain_shape)
        loss = (A(x) - y).square().mean()
        net.zero_grad(set_to_none=True)
        loss.backward()
        return loss.item()  # the DIP loop reads the loss every step, so the floor does too

    states = fit_dip(net, A, y, z, cfg, g)
    for _ in range(3):  # warm-up: allocator, ASTRA/CSR caches, Adam state
        floor_step()
        next(states)
    # Paired, finely interleaved timing: floor step, DIP iteration, floor step, ... so that both
    # see the same machine load; the medians of the per-step times are compared.
    t_floor, t_iter = [], []
    for _ in range(rounds * iters):
        sync()
        t0 = time.perf_counter()
        floor_step()
        sync()
        t1 = time.perf_counter()
        next(states)
        sync()
        t_floor.append(t1 - t0)
        t_iter.append(time.perf_counter() - t1)
    states.close()
    # components of the floor, for the record
    x = net(z).detach().reshape(A.domain_shape)

    n_timed = max(3, iters // 2)

    def timed(fn, n=n_timed):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    with torch.no_grad():
        t_A = timed(lambda: A(x))
        t_AT = timed(lambda: A.T(y))
    f, b = float(np.median(t_floor)), float(np.median(t_iter))
    out = {
        "case": name, "device": str(A.device), "backend": getattr(A, "backend", "?"),
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in net.parameters()),
        "floor_ms": 1e3 * f, "iter_ms": 1e3 * b, "overhead": b / f - 1.0,
        "A_ms": 1e3 * t_A, "AT_ms": 1e3 * t_AT,
        "peak_mem_mib": (torch.cuda.max_memory_allocated() / 2**20 if cuda
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "mem_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
    }
    return out


#: the 3D U-Net before issue #11 point 6 and today's defaults (NetworkConfig fields)
UNET_OLD = {"scales": 4, "channels": 32, "skip_channels": 4, "fast_conv": False, "channels_last": False}
UNET_NEW = {"scales": 4, "skip_channels": 4}


def _unet_pair():
    from dipuq.dip.networks import NetworkConfig, UNet

    return {k: UNet.from_config(NetworkConfig(**kw), 3, generator=torch.Generator().manual_seed(0))
            for k, kw in (("old", UNET_OLD), ("new", UNET_NEW))}


def unet_step_times(n: int, reps: int) -> dict:
    """Median forward + backward ms of the old and the new 3D U-Net on an n³ input (alternating)."""
    nets = _unet_pair()
    z = torch.randn(1, 1, n, n, n, generator=torch.Generator().manual_seed(1))

    def step(net):
        net.zero_grad(set_to_none=True)
        net(z).square().mean().backward()

    for net in nets.values():  # warm-up
        step(net)
    times = {k: [] for k in nets}
    for _ in range(reps):
        for k, net in nets.items():
            t0 = time.perf_counter()
            step(net)
            times[k].append(time.perf_counter() - t0)
    return {"n": n, "reps": reps, **{f"{k}_ms": 1e3 * float(np.median(v)) for k, v in times.items()},
            **{f"{k}_params": sum(p.numel() for p in net.parameters()) for k, net in nets.items()}}


def unet_fit_psnr(iters: int) -> dict:
    """DIP fits of the old and the new 3D U-Net on the 32³ demo cone-beam scan, steps alternating."""
    from dipuq.commands.demo import demo_scan
    from dipuq.dip.fit import DipConfig, fit_dip, make_input
    from dipuq.maps.metrics import psnr
    from dipuq.operators import RayTransform

    scan = demo_scan(32, 20, 0.02)
    A = RayTransform(scan.geometry)
    y = torch.as_tensor(scan.projections, dtype=A.dtype)
    x_true = torch.as_tensor(scan.reference, dtype=A.dtype)
    cfg = DipConfig(iterations=iters, lr=2e-3, gamma=1e-4, input="fbp", stop="none")
    z = make_input(A, y, cfg)
    fits = {}
    for k, net in _unet_pair().items():
        fits[k] = {"states": fit_dip(net, A, y, z, cfg, torch.Generator().manual_seed(2)), "s": 0.0, "best": -np.inf}
    for _ in range(iters):
        for f in fits.values():
            t0 = time.perf_counter()
            st = next(f["states"], None)
            f["s"] += time.perf_counter() - t0
            if st is not None:
                f["best"] = max(f["best"], psnr(st.recon, x_true))
                f["last"] = st
    out = {"iters": iters, "fdk_psnr": psnr(z, x_true)}
    for k, f in fits.items():
        f["states"].close()
        st = f["last"]
        out.update({f"{k}_s": f["s"], f"{k}_psnr": psnr(st.best_recon, x_true), f"{k}_best_psnr": f["best"],
                    f"{k}_kept": st.best_iteration})
    return out


def unet_main(args) -> None:
    reps32, reps64 = (5, 2) if args.quick else (9, 3)
    rows = [unet_step_times(32, reps32), unet_step_times(64, reps64)]
    print("3D U-Net, 4 scales, skip 4: old = channels 32, fast_conv off, channels_last off; "
          "new = defaults (channels 0 -> 16,32,32,32, fast_conv, channels_last)")
    hdr = f"{'input':<6} {'old params':>10} {'new params':>10} {'old ms':>9} {'new ms':>9} {'speed-up':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['n']:>3}³   {r['old_params']:>10d} {r['new_params']:>10d} {r['old_ms']:>9.1f} {r['new_ms']:>9.1f} "
              f"{r['old_ms'] / r['new_ms']:>7.2f}×")
    print(f"# forward + backward of mean(f(z)²), medians of {reps32} (32³) / {reps64} (64³) alternating "
          f"old/new steps; {torch.get_num_threads()} CPU threads")
    fit = unet_fit_psnr(args.fit_iters)
    print(f"DIP fit, 32³ cone beam (dipuq demo scan: 20 views, 2 % noise), {fit['iters']} Adam steps each "
          f"(lr 2e-3, TV 1e-4, steps alternating); FDK input {fit['fdk_psnr']:.2f} dB")
    for k in ("old", "new"):
        print(f"  {k}: PSNR {fit[k + '_psnr']:.2f} dB (kept iterate {fit[k + '_kept']}, lowest loss), "
              f"best on the way {fit[k + '_best_psnr']:.2f} dB; {fit[k + '_s']:.1f} s "
              f"({1e3 * fit[k + '_s'] / fit['iters']:.0f} ms/step)")


def gpu_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    from dipuq.operators import cuda_available

    return cuda_available()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed iterations")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core box, 2 threads oversubscribe)")
    ap.add_argument("--iters", type=int, default=None, help="iterations per timed round")
    ap.add_argument("--unet-only", action="store_true", help="only the old-vs-new 3D U-Net comparison")
    ap.add_argument("--fit-iters", type=int, default=200, help="Adam steps of each 32³ DIP fit (U-Net part)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    iters = args.iters or (5 if args.quick else 10)
    rounds = 3 if args.quick else 5

    if args.case:
        print(json.dumps(run_case(args.case, iters, rounds)))
        return 0
    if args.unet_only:
        unet_main(args)
        return 0

    names = [n for n in CASES if CASES[n][6] == "cpu"]
    if gpu_ok():
        names.append("3d-128-gpu")
    else:
        print("# no usable CUDA device / ASTRA CUDA: skipping the 3D 128³ GPU case")
    rows = []
    for n in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", n, "--threads", str(args.threads),
               "--iters", str(iters)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"# case {n} failed:\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    hdr = (f"{'case':<12} {'device':<7} {'backend':<11} {'params':>8} {'A ms':>8} {'Aᵀ ms':>8} "
           f"{'floor ms':>9} {'iter ms':>9} {'iter/floor':>10} {'overhead':>9} {'peak MiB':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        flag = "" if r["overhead"] <= 0.10 else "  > 10 %"
        print(f"{r['case']:<12} {r['device']:<7} {r['backend']:<11} {r['params']:>8d} {r['A_ms']:>8.2f} "
              f"{r['AT_ms']:>8.2f} {r['floor_ms']:>9.2f} {r['iter_ms']:>9.2f} {r['iter_ms'] / r['floor_ms']:>10.3f} "
              f"{100 * r['overhead']:>8.1f}%{' ' if not flag else ''}{r['peak_mem_mib']:>9.0f}{flag}")
    print(f"# floor = net forward + backward + one A + one Aᵀ; medians over {rounds * iters} alternating "
          f"floor/DIP steps; {args.threads} CPU threads; peak memory = process max RSS (CPU) / "
          "torch.cuda.max_memory_allocated (GPU)")
    print()
    unet_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
