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
  was alone when it started degrades gracefully when a neighbour arrives; below its ceiling it
  now and then tries one thread more for a few steps and keeps it only if the steps got clearly
  faster, so a process that started beside a neighbour (or behind a load average that still
  counted a finished job) takes the cores back when they free up.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch

__all__ = ["configure", "fixed", "free_cores", "thread_ceiling", "ThreadGovernor"]

_CEILING: int | None = None  # the most threads dipuq may use, set by configure()


def _cores() -> int:
    """Cores of this process's affinity set."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cores() -> int:
    """Cores of this process's affinity set minus the whole cores the 1-minute load average says are
    busy (at least 1): a load of 0.5 left over from a finished job keeps both cores of two."""
    cores = _cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - int(math.floor(busy))))


def configure() -> int:
    """Set torch's intra-op threads (user's choice, else :func:`free_cores`); return the count.

    Also sets :func:`thread_ceiling`: the user's choice, else every core of the affinity set.
    """
    global _CEILING
    want = os.environ.get("DIPUQ_THREADS")
    if want:
        n = _CEILING = max(1, int(want))
    elif os.environ.get("OMP_NUM_THREADS"):
        _CEILING = torch.get_num_threads()
        return _CEILING
    else:
        n, _CEILING = free_cores(), _cores()
    torch.set_num_threads(n)
    return n


def thread_ceiling() -> int:
    """The most threads a :class:`ThreadGovernor` may raise torch to: set by :func:`configure`
    (the ``dipuq`` command); where it never ran (dipuq used as a library, the tests), the
    count torch has now, so a caller's own choice is never exceeded."""
    return _CEILING if _CEILING is not None else torch.get_num_threads()


@contextlib.contextmanager
def fixed(n: int):
    """Run the block on exactly ``n`` torch threads with the governor's ceiling at ``n`` too (the
    experiments: a seed must give identical numbers), then restore both."""
    global _CEILING
    before = torch.get_num_threads(), _CEILING
    torch.set_num_threads(n)
    _CEILING = n
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        _CEILING = before[1]


class ThreadGovernor:
    """A per-step callback that lowers torch's thread count when steps slow down.

    Every ``window`` steps it takes the median step time of the window; when that exceeds
    ``factor`` × the fastest window median seen at the current thread count, and more than one
    thread is in use, it drops one thread. Below ``ceiling`` (default :func:`thread_ceiling`),
    every ``probe_every`` steps at a steady count it times ``probe_window`` steps on one thread
    more and keeps it only when their median is ``gain`` × faster; a failed try doubles the wait
    before the next (oversubscription is the larger risk: a try on busy cores costs a few slow
    steps, halving in share each time). ``events`` records ``(step, threads_before,
    threads_after, median_s)`` for every change of count: a drop, a try's start and a failed
    try's return (a kept try adds no event).
    """

    def __init__(self, window: int = 50, factor: float = 1.8, clock=time.perf_counter, log=None,
                 ceiling: int | None = None, probe_every: int = 500, probe_window: int = 10, gain: float = 1.2):
        self.window, self.factor, self.clock, self.log = int(window), float(factor), clock, log
        self.ceiling = int(ceiling) if ceiling is not None else thread_ceiling()
        self.probe_window, self.gain = int(probe_window), float(gain)
        self.probe_every = self._interval = int(probe_every)
        self.events: list[tuple[int, int, int, float]] = []
        self._last, self._times, self._best, self._steps = None, [], math.inf, 0
        self._since = 0  # steps since the thread count last changed or a probe ended
        self._probe: tuple[int, float] | None = None  # (threads before the probe, their best median)

    def _restart(self) -> None:
        """Start timing afresh (the first step at a new count is not timed)."""
        self._times, self._last, self._since = [], None, 0

    def _set(self, n_from: int, n_to: int, med: float) -> None:
        torch.set_num_threads(n_to)
        self.events.append((self._steps, n_from, n_to, med))
        self._restart()

    def __call__(self, state=None) -> None:
        now = self.clock()
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now
        self._steps += 1
        self._since += 1
        if self._probe is not None:
            self._end_probe()
            return
        if len(self._times) < self.window:
            return
        med = sorted(self._times)[len(self._times) // 2]
        self._times = []
        n = torch.get_num_threads()
        if med > self.factor * self._best and n > 1:
            self._set(n, n - 1, med)
            if self.log is not None:
                self.log(f"dipuq: steps slowed to {med * 1e3:.0f} ms (best {self._best * 1e3:.0f} ms): the cores are "
                         f"shared; using {n - 1} thread(s) instead of {n}")
            self._best = math.inf  # re-learn the pace at the new count
            self._interval = self.probe_every
            return
        self._best = min(self._best, med)
        if n < self.ceiling and self.probe_every > 0 and self._since >= self._interval:
            self._probe = (n, self._best)
            self._set(n, n + 1, med)

    def _end_probe(self) -> None:
        """After ``probe_window`` timed steps at one thread more: keep it if the steps got ``gain`` ×
        faster, else go back and wait twice as long before the next try (a failed try costs a
        few oversubscribed steps)."""
        if len(self._times) < self.probe_window:
            return
        n, best = self._probe
        self._probe = None
        med = sorted(self._times)[len(self._times) // 2]
        if med * self.gain < best:
            self._restart()
            self._best, self._interval = med, self.probe_every
            if self.log is not None:
                self.log(f"dipuq: steps sped up to {med * 1e3:.0f} ms (was {best * 1e3:.0f} ms) on one more thread: "
                         f"cores are free again; using {n + 1} thread(s)")
        else:
            self._set(n + 1, n, med)
            self._best, self._interval = best, 2 * self._interval
