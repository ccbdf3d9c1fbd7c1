"""U-Net step time by thread count, on an idle machine and beside one competing busy process.

Prints, for each problem size, the median step (forward + backward + Adam) with 1 and 2 threads,
first alone, then with one CPU-bound neighbour, and the slowdown ratios side by side in one run.
This is the measurement behind dipuq's thread policy (dipuq/threads.py).

    python benchmarks/threads.py
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch

from dipuq.dip.networks import NetworkConfig, UNet

CASES = [("2D 128², 4 scales × 16", 2, 128, 16, 4), ("3D 24³, 3 scales × 8", 3, 24, 8, 3)]


def _busy(stop):
    while not stop.is_set():
        pass


def step_ms(ndim, n, ch, scales, threads, steps=40):
    torch.set_num_threads(threads)
    net = UNet.from_config(NetworkConfig(scales=scales, channels=ch, skip_channels=2), ndim=ndim,
                           generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 1, *([n] * ndim), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    times = []
    for i in range(steps + 5):
        t = time.perf_counter()
        loss = net(z).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 5:
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    rows = []
    for name, ndim, n, ch, sc in CASES:
        idle = {t: step_ms(ndim, n, ch, sc, t) for t in (1, 2)}
        stop = mp.Event()
        hog = mp.Process(target=_busy, args=(stop,), daemon=True)
        hog.start()
        try:
            time.sleep(0.5)
            loaded = {t: step_ms(ndim, n, ch, sc, t) for t in (1, 2)}
        finally:
            stop.set()
            hog.join()
        rows.append((name, idle, loaded))
    print("| case | idle 1 thr | idle 2 thr | loaded 1 thr | loaded 2 thr | loaded 2 thr / loaded 1 thr |")
    print("|---|---|---|---|---|---|")
    for name, idle, loaded in rows:
        print(f"| {name} | {idle[1]:.1f} ms | {idle[2]:.1f} ms | {loaded[1]:.1f} ms | {loaded[2]:.1f} ms | "
              f"{loaded[2] / loaded[1]:.2f} |")


if __name__ == "__main__":
    main()
