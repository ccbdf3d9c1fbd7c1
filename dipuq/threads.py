"""CPU thread policy: start with the cores that are free, and back off when the machine fills up.

torch's intra-op thread pool spins on every core it was given. When another CPU-bound process
shares the cores, the threads oversubscribe them and a step slows several-fold (measured on 2 cores
with one competing busy process: a 2D 128² U-Net step went from 23 ms on 2 threads to 137 ms,
while 1 thread stayed at 34 ms). Two measures:

* :func:`configure` (the ``dipuq`` command calls it once) sets the pool to the cores not already
  busy by the 1-minute load average, unless the user chose (``OMP_NUM_THREADS`` or
  ``DIPUQ_THREADS``);
* :class:`ThreadGovernor`, a callback for long loops (the DIP fit), times windows of steps and
  drops one thread whenever a window is much slower than the best one seen, so a process that
  was alone when it started degrades gracefully when a neighbour arrives.
"""

from __future__ import annotations

import math
import os
import time

import torch

__all__ = ["configure", "free_cores", "ThreadGovernor"]


def free_cores() -> int:
    """Cores of this process's affinity set minus the whole cores the 1-minute load average says are
    busy (at least 1): a load of 0.5 left over from a finished job keeps both cores of two."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - int(math.floor(busy))))


def configure() -> int:
    """Set torch's intra-op threads (user's choice, else :func:`free_cores`); return the count."""
    want = os.environ.get("DIPUQ_THREADS")
    if want:
        n = max(1, int(want))
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        n = free_cores()
    torch.set_num_threads(n)
    return n


class ThreadGovernor:
    """A per-step callback that lowers torch's thread count when steps slow down.

    Every ``window`` steps it takes the median step time of the window; when that exceeds
    ``factor`` × the fastest window median seen at the current thread count, and more than one
    thread is in use, it drops one thread (never raises it: oversubscription is the larger risk).
    ``events`` records ``(step, threads_before, threads_after, median_s)``.
    """

    def __init__(self, window: int = 50, factor: float = 1.8, clock=time.perf_counter, log=None):
        self.window, self.factor, self.clock, self.log = int(window), float(factor), clock, log
        self.events: list[tuple[int, int, int, float]] = []
        self._last, self._times, self._best, self._steps = None, [], math.inf, 0

    def __call__(self, state=None) -> None:
        now = self.clock()
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now
        self._steps += 1
        if len(self._times) < self.window:
            return
        med = sorted(self._times)[len(self._times) // 2]
        self._times = []
        n = torch.get_num_threads()
        if med > self.factor * self._best and n > 1:
            torch.set_num_threads(n - 1)
            self.events.append((self._steps, n, n - 1, med))
            if self.log is not None:
                self.log(f"dipuq: steps slowed to {med * 1e3:.0f} ms (best {self._best * 1e3:.0f} ms): the cores are "
                         f"shared; using {n - 1} thread(s) instead of {n}")
            self._best, self._last = math.inf, None  # re-learn the pace at the new count
        else:
            self._best = min(self._best, med)
