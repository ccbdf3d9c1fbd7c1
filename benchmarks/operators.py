"""Benchmark the ray-transform backends: A + Aᵀ time against calling ASTRA once per image.

    python benchmarks/operators.py [--quick] [--threads N]   (default 1 thread, like ASTRA CPU)

Prints one table. Rows:
- 2D 128², 60 angles: astra-cpu sparse CSR pair (batch 1 and per image in a batch of 8) vs one
  direct ASTRA CPU FP + BP call per image (and ASTRA's high-level create_sino/backprojection).
- 3D parallel 64³, 60 angles: astra-cpu slice-wise sparse product vs looping ASTRA 2D over slices.
- cone 32³ and 64³, 60 views: dipuq's cpu-cone vs one JVP + VJP (w.r.t. the weights) of a small
  3D U-Net-like network at the same size (defined inline: the DIP network lives elsewhere).
- matrix build time and memory of every sparse operator.
- on a GPU (when ASTRA CUDA is usable): astra-cuda at 128³ vs raw ASTRA direct calls.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn

from dipuq.geometry import Geometry, lift3d
from dipuq.operators import RayTransform, _astra, cuda_available


def timeit(fn, repeat=5, warmup=1, sync=False) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def build(g, backend, device=None):
    t = time.perf_counter()
    A = RayTransform(g, backend=backend, device=device)
    return A, time.perf_counter() - t


class TinyUNet3d(nn.Module):
    """A small 3D U-Net-like net (3 scales, 16/32/64 channels, GroupNorm, LeakyReLU, skips)."""

    def __init__(self, ch=(16, 32, 64), skip=4):
        super().__init__()

        def block(i, o, stride=1):
            return nn.Sequential(nn.Conv3d(i, o, 3, stride, 1), nn.GroupNorm(4, o), nn.LeakyReLU(0.2),
                                 nn.Conv3d(o, o, 3, 1, 1), nn.GroupNorm(4, o), nn.LeakyReLU(0.2))

        self.inc = block(1, ch[0])
        self.down = nn.ModuleList([block(ch[i], ch[i + 1], 2) for i in range(len(ch) - 1)])
        self.skips = nn.ModuleList([nn.Conv3d(c, skip, 1) for c in ch[:-1]])
        self.up = nn.ModuleList([block(ch[i + 1] + skip, ch[i]) for i in reversed(range(len(ch) - 1))])
        self.out = nn.Conv3d(ch[0], 1, 1)

    def forward(self, x):
        hs = [self.inc(x)]
        for d in self.down:
            hs.append(d(hs[-1]))
        h = hs.pop()
        for u, s in zip(self.up, reversed(self.skips)):
            skip = hs.pop()
            h = nn.functional.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = u(torch.cat([h, s(skip)], 1))
        return self.out(h)


def net_jvp_vjp_time(n, repeat) -> float:
    net = TinyUNet3d()
    params = {k: v.detach() for k, v in net.named_parameters()}
    z = torch.randn(1, 1, n, n, n, generator=torch.Generator().manual_seed(0))
    tang = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        return torch.func.functional_call(net, p, (z,))

    def run():
        _, jv = torch.func.jvp(f, (params,), (tang,))
        _, vjp = torch.func.vjp(f, params)
        vjp(jv)

    return timeit(run, repeat=repeat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip the 64³ cone case")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: ASTRA's CPU projectors are single-threaded too)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rep = 3 if args.quick else 7
    rows = []  # (problem, method, seconds, note)
    gen = torch.Generator().manual_seed(0)

    # ---------------- 2D 128², 60 angles ----------------
    g2 = Geometry.parallel2d(np.linspace(0, np.pi, 60, endpoint=False), (128, 128))
    A, tb = build(g2, "astra-cpu")
    x1 = torch.rand(1, 128, 128, generator=gen)
    x8 = torch.rand(8, 128, 128, generator=gen)
    t_sp1 = timeit(lambda: A.T(A(x1)), rep)
    t_sp8 = timeit(lambda: A.T(A(x8)), rep) / 8
    vec = g2.to_vectors()
    pj = _astra.projector2d("parallel", g2.vol_shape, 1.0, g2.det_shape[0], vec)
    xn = x1[0].numpy()

    def astra_direct():
        s = _astra.fp2d("parallel", g2.vol_shape, 1.0, g2.det_shape[0], vec, xn, pj)
        _astra.bp2d("parallel", g2.vol_shape, 1.0, g2.det_shape[0], vec, s, pj)

    def astra_high():
        s = _astra.create_sino2d(pj, xn)
        _astra.create_backprojection2d(pj, s)

    t_ad = timeit(astra_direct, rep)
    t_ah = timeit(astra_high, rep)
    Ac, tbc = build(g2, "cpu-cone")
    t_c1 = timeit(lambda: Ac.T(Ac(x1)), rep)
    p = "2D 128², 60 ang"
    rows += [(p, "ASTRA CPU direct FP+BP, per image", t_ad, "baseline"),
             (p, "ASTRA create_sino+create_backprojection", t_ah, f"{t_ah / t_ad:.2f}× baseline"),
             (p, "astra-cpu sparse, batch 1", t_sp1, f"{t_ad / t_sp1:.1f}× faster (target ≥ 4×)"),
             (p, "astra-cpu sparse, per image of batch 8", t_sp8, f"{t_ad / t_sp8:.1f}× faster"),
             (p, "cpu-cone sparse, batch 1", t_c1, f"{t_ad / t_c1:.1f}× faster")]
    builds = [("2D 128² astra-cpu", tb, A.nnz, A.nbytes), ("2D 128² cpu-cone", tbc, Ac.nnz, Ac.nbytes)]

    # ---------------- 3D parallel 64³, 60 angles ----------------
    n = 64
    g3 = Geometry.parallel3d(np.linspace(0, np.pi, 60, endpoint=False), (n, n, n))
    A3, tb3 = build(g3, "astra-cpu")
    x3 = torch.rand(1, n, n, n, generator=gen)
    t_s3 = timeit(lambda: A3.T(A3(x3)), rep)
    g2s = Geometry.parallel2d(g3.angles, (n, n), det_count=g3.det_shape[1])
    v2 = g2s.to_vectors()
    pj2 = _astra.projector2d("parallel", (n, n), 1.0, g3.det_shape[1], v2)
    x3n = x3[0].numpy()

    def astra_loop():
        for k in range(n):
            s = _astra.fp2d("parallel", (n, n), 1.0, g3.det_shape[1], v2, x3n[k], pj2)
            _astra.bp2d("parallel", (n, n), 1.0, g3.det_shape[1], v2, s, pj2)

    t_loop = timeit(astra_loop, rep)
    p = "3D par 64³, 60 ang"
    rows += [(p, "ASTRA 2D direct FP+BP looped over 64 slices", t_loop, "baseline"),
             (p, "astra-cpu slice-wise sparse", t_s3, f"{t_loop / t_s3:.1f}× faster (target ≥ 20×)")]
    builds.append(("3D par 64³ astra-cpu", tb3, A3.nnz, A3.nbytes))
    if not args.quick:
        A3c, tb3c = build(g3, "cpu-cone")
        t_c3 = timeit(lambda: A3c.T(A3c(x3)), rep)
        rows.append((p, "cpu-cone (3D trilinear)", t_c3, f"{t_loop / t_c3:.1f}× faster"))
        builds.append(("3D par 64³ cpu-cone", tb3c, A3c.nnz, A3c.nbytes))
        del A3c

    # ---------------- cone 32³ / 64³, 60 views ----------------
    for n in ([32] if args.quick else [32, 64]):
        gc = Geometry.cone3d(np.linspace(0, 2 * np.pi, 60, endpoint=False), (n, n, n), (n, 3 * n // 2),
                             source_origin=3 * n, origin_detector=n, det_spacing=1.5)
        Acn, tbc = build(gc, "cpu-cone")
        xc = torch.rand(1, n, n, n, generator=gen)
        t_cone = timeit(lambda: Acn.T(Acn(xc)), rep)
        t_net = net_jvp_vjp_time(n, max(2, rep // 2))
        p = f"cone {n}³, 60 views"
        rows += [(p, "TinyUNet3d JVP + VJP (w.r.t. weights)", t_net, "baseline"),
                 (p, f"cpu-cone A+Aᵀ (det {gc.det_shape})", t_cone,
                  f"{100 * t_cone / t_net:.1f}% of net (target < 25%)")]
        builds.append((f"cone {n}³ cpu-cone", tbc, Acn.nnz, Acn.nbytes))
        del Acn

    # ---------------- GPU ----------------
    if cuda_available():
        n = 128
        for beam in ("parallel", "cone"):
            if beam == "parallel":
                g = Geometry.parallel3d(np.linspace(0, np.pi, 180, endpoint=False), (n, n, n))
            else:
                g = Geometry.cone3d(np.linspace(0, 2 * np.pi, 180, endpoint=False), (n, n, n), (n, 3 * n // 2),
                                    source_origin=3 * n, origin_detector=n, det_spacing=1.5)
            Ag, tbg = build(g, "astra-cuda")
            xg = torch.rand(1, n, n, n, device="cuda")
            t_w = timeit(lambda: Ag.T(Ag(xg)), rep, sync=True)
            b3, vol3, det3, vec3 = lift3d(g)
            raw = _astra.CudaProjector3D(b3, vol3, 1.0, det3, vec3)
            vol = xg[0].contiguous()
            proj = torch.empty(det3[0], g.n_angles, det3[1], device="cuda")
            out = torch.empty_like(vol)

            def raw_call():
                raw.fp(vol, proj)
                raw.bp(proj, out)

            t_r = timeit(raw_call, rep, sync=True)
            p = f"GPU {beam} 128³, 180 ang"
            rows += [(p, "raw ASTRA direct_FP3D + direct_BP3D", t_r, "baseline"),
                     (p, "astra-cuda RayTransform A + Aᵀ", t_w, f"overhead {100 * (t_w / t_r - 1):+.1f}%")]
    else:
        rows.append(("GPU", "astra-cuda", float("nan"), "skipped: no CUDA device with ASTRA CUDA"))

    # ---------------- print ----------------
    print(f"\ndipuq operator benchmark (torch threads {args.threads}, A + Aᵀ per call, median of {rep})\n")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'problem':<{w0}}  {'method':<{w1}}  {'time [ms]':>10}  note")
    print("-" * (w0 + w1 + 40))
    for prob, meth, t, note in rows:
        print(f"{prob:<{w0}}  {meth:<{w1}}  {1e3 * t:>10.2f}  {note}")
    print(f"\n{'sparse operator':<24} {'build [s]':>10} {'nnz':>14} {'A+Aᵀ memory [MB]':>18}")
    for name, t, nnz, nb in builds:
        print(f"{name:<24} {t:>10.2f} {nnz:>14,} {nb / 1e6:>18.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
