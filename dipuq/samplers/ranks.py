"""Where this process sits in a ``torchrun`` job (rank r of W, its device) and the collectives
between ranks, with failures that never hang silently.

Launch with ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); without those variables :func:`init_distributed` returns a single-process
context whose collectives are no-ops, so the same code runs unchanged in both cases. Backends:
NCCL for CUDA tensors (with gloo alongside for Python objects and CPU tensors), gloo on CPU.

Failures never hang silently:

* a rank whose share raises (e.g. a diverging sampler) makes *every* rank raise
  :class:`DistributedError` naming the failing rank and its message (:meth:`DistContext.agree`);
* a rank that dies or stops responding inside a collective gives the others a
  :class:`DistributedError` within ``timeout_s``;
* ranks waiting for rank 0 (:meth:`DistContext.on_main`, :meth:`DistContext.broadcast_object`,
  e.g. during a long DIP fit) wait up to ``wait_timeout_s`` but stop at once when rank 0 reports
  a failure (through the rendezvous store).

Sharded sampling on top of this is :mod:`dipuq.samplers.distributed`.

Example (run under ``torchrun --nproc_per_node 2``, or plainly as one process)::

    >>> from dipuq.samplers.ranks import init_distributed            # doctest: +SKIP
    >>> with init_distributed() as dctx:                              # doctest: +SKIP
    ...     dip = dctx.on_main(run_dip, net, A, y)    # rank 0 fits, every rank gets the result
"""

from __future__ import annotations

import datetime
import faulthandler
import functools
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dipuq.errors import DipuqError, GPUUnavailableError

__all__ = [
    "DistributedError", "DistContext", "init_distributed", "current_context", "main_only", "made_process_group",
]

_FAILED_KEY = "dipuq/failed"
_SEEN_KEY = "dipuq/failed_seen"


class DistributedError(DipuqError, RuntimeError):
    """A rank failed, died or timed out; the message names the rank and the cause."""


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    # gloo prefixes its messages with a source location "[/path/file.cc:123] "
    if msg.startswith("[") and "] " in msg[:200]:
        msg = msg.split("] ", 1)[1]
    if len(msg) > 120 and ". " in msg[40:]:  # backend messages add advice after the first sentence
        msg = msg[: msg.index(". ", 40) + 1]
    msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


@dataclass
class DistContext:
    """Where this process sits in a (possibly one-process) job: rank r of W, and its device.

    ``backend is None`` means a single process without a process group: every collective is the
    identity. Build one with :func:`init_distributed`; use it as a context manager so that a rank
    that fails tells the others (they stop waiting) and the process group is shut down.

    Attributes
    ----------
    rank, world_size, local_rank : int
        Global rank r ∈ [0, W), number of ranks W, rank on this node (selects the GPU).
    device : torch.device
        This rank's compute device (``cuda:LOCAL_RANK`` on GPUs).
    backend : str or None
        ``"gloo"``, ``"cpu:gloo,cuda:nccl"``, ``"nccl"``, or None (single process).
    timeout_s : float
        Limit for one collective (all ranks are expected at it together).
    wait_timeout_s : float
        Limit for waiting on rank 0's result in :meth:`on_main` / :meth:`broadcast_object`.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = 600.0
    wait_timeout_s: float = 86400.0
    owns_group: bool = False
    _n_keys: int = 0

    # -- facts ---------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group is active (even of one rank)."""
        return self.backend is not None

    def describe(self) -> str:
        if not self.is_distributed:
            return f"single process on {self.device}"
        return f"rank {self.rank} of {self.world_size} ({self.backend}) on {self.device}, host {socket.gethostname()}"

    # -- plumbing ------------------------------------------------------------------------------
    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turn a backend error inside a collective (peer crashed, hung, unreachable) into one line."""
        try:
            yield
        except DipuqError:
            raise
        except (RuntimeError, OSError) as exc:
            raise DistributedError(
                f"distributed {what} failed on rank {self.rank} of {self.world_size}: another rank crashed, "
                f"exited or did not respond within {self.timeout_s:g} s ({_first_line(exc)})"
            ) from exc

    def _comm_device(self, t: torch.Tensor) -> torch.device:
        """Where ``t`` must live for an all-reduce: its own device if the backend serves it, else CPU."""
        if t.device.type == "cuda" and self.backend is not None and "nccl" in self.backend:
            return t.device
        if t.device.type == "cpu" and self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _store(self):
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - private API: fall back to plain collectives
            return None

    def _next_key(self, kind: str) -> str:
        self._n_keys += 1  # every rank calls the same collectives in the same order
        return f"dipuq/{kind}/{self._n_keys}"

    def _wait_key(self, key: str, timeout_s: float | None, what: str) -> str:
        """Poll the rendezvous store until ``key`` is set (returns its value) or a rank failed."""
        store = self._store()
        if store is None:
            return "ok"
        limit = self.wait_timeout_s if timeout_s is None else float(timeout_s)
        t0, pause = time.monotonic(), 0.05
        try:
            while True:
                if store.check([key]):
                    return store.get(key).decode()
                if store.check([_FAILED_KEY]):
                    msg = store.get(_FAILED_KEY).decode()
                    store.add(_SEEN_KEY, 1)  # lets a failing store host exit (see signal_failure)
                    raise DistributedError(f"rank {self.rank} stopped waiting for {what}: {msg}")
                if time.monotonic() - t0 > limit:
                    raise DistributedError(f"rank {self.rank} timed out after {limit:g} s waiting for {what} "
                                           f"(raise DistContext.wait_timeout_s if that work is just slow)")
                time.sleep(pause)
                pause = min(2 * pause, 0.5)
        except DipuqError:
            raise
        except (RuntimeError, OSError) as exc:  # the store's host (rank 0 or the agent) went away
            raise DistributedError(f"rank {self.rank} lost the rendezvous store while waiting for {what}: "
                                   f"{_first_line(exc)}") from exc

    def signal_failure(self, exc: BaseException) -> None:
        """Tell every rank waiting on the store that this rank failed (best effort, never raises)."""
        store = self._store() if self.is_distributed else None
        if store is None:
            return
        try:
            if store.check([_FAILED_KEY]):
                return
            store.set(_FAILED_KEY, f"rank {self.rank} ({socket.gethostname()}) failed: {_first_line(exc)}")
            if self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                # this process hosts the store: linger (≤ 5 s) until the waiting ranks have read it
                t0 = time.monotonic()
                while store.add(_SEEN_KEY, 0) < self.world_size - 1 and time.monotonic() - t0 < 5.0:
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store itself may be gone
            pass

    # -- collectives -----------------------------------------------------------------------------
    def barrier(self) -> None:
        """Wait until every rank arrives (limit ``timeout_s``)."""
        if self.is_distributed:
            with self._collective("barrier"):
                dist.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``t`` over ranks (identical result on every rank); returns ``t``."""
        if not self.is_distributed:
            return t
        dev = self._comm_device(t)
        buf = t if t.device == dev else t.to(dev)
        with self._collective("all-reduce"):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """[obj of rank 0, …, obj of rank W−1] on every rank (small picklable objects)."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective("all-gather"):
            dist.all_gather_object(out, obj)
        return out

    def agree(self, error: BaseException | None, what: str) -> None:
        """Collective check that every rank succeeded at ``what``; raises on every rank otherwise.

        Each rank passes the exception its share raised (or None). If any rank failed, all raise
        :class:`DistributedError` listing the failing ranks and their messages (on a failing rank,
        chained to its own exception), so no rank is left waiting in a later collective.
        """
        if not self.is_distributed:
            if error is not None:
                raise error
            return
        msgs = self.all_gather_object(None if error is None else _first_line(error))
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if bad:
            detail = "; ".join(f"rank {r}: {m}" for r, m in bad)
            raise DistributedError(f"{what} failed on {len(bad)} of {self.world_size} ranks ({detail})") from error

    def broadcast_object(self, obj: Any = None, src: int = 0, timeout_s: float | None = None) -> Any:
        """Rank ``src``'s ``obj`` on every rank (picklable; tensors come back on CPU).

        The other ranks may wait here for a long time (rank ``src`` still computing ``obj``, e.g.
        the DIP fit): up to ``timeout_s`` (default ``wait_timeout_s``), not the collective limit,
        and they stop at once with :class:`DistributedError` if a rank signals a failure.
        """
        if not self.is_distributed:
            return obj
        key = self._next_key("bcast")
        if self.rank == src:
            if self._store() is not None:
                with self._collective("broadcast (store)"):
                    self._store().set(key, "ok")
        else:
            self._wait_key(key, timeout_s, f"rank {src}'s result")
        if self.rank == src:
            obj = _to_cpu(obj)
        box = [obj if self.rank == src else None]
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def on_main(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` computed once on rank 0, its result broadcast to every rank.

        If ``fn`` raises on rank 0, rank 0 re-raises it and every other rank raises
        :class:`DistributedError` with its message (no hang). Example: ``dip = dctx.on_main(run_dip, ...)``.
        """
        if not self.is_distributed:
            return fn(*args, **kwargs)
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self.signal_failure(exc)
                raise
            return self.broadcast_object(result, src=0)
        return self.broadcast_object(None, src=0)

    def main_only(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` on rank 0 only (file writes); None on the other ranks."""
        return fn(*args, **kwargs) if self.is_main else None

    # -- lifetime --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Destroy the process group this context created (idempotent)."""
        global _CURRENT
        if self.owns_group and dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - shutting down after a failure: nothing more to do
                pass
        self.owns_group = False
        if _CURRENT is self:
            _CURRENT = None

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, DistributedError):
            self.signal_failure(exc)
        elif exc is None and self.owns_group:
            # leave together: a rank tearing down its gloo pairs while a peer still uses them
            # can abort the peer at exit (seen once in 10 torchrun runs under heavy load)
            try:
                self.barrier()
            except DipuqError:
                pass
        self.shutdown()


_CURRENT: DistContext | None = None
_MADE_GROUP = False  # this process formed a process group (see made_process_group)


def _to_cpu(obj: Any) -> Any:
    """Move tensors inside (nested) dicts/lists/tuples to CPU, so any rank can unpickle them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def current_context() -> DistContext:
    """The context made by the last :func:`init_distributed` (a single-process one if none)."""
    return _CURRENT if _CURRENT is not None else DistContext()


def main_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn`` on rank 0 of :func:`current_context` only (returns None elsewhere).

    Example::

        @main_only
        def save(path, arr): np.save(path, arr)
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if current_context().is_main else None

    return wrapper


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(f"distributed launch: environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"distributed launch: {name}={raw!r} is not an integer") from None


def _resolve_device(device, local_rank: int) -> torch.device:
    want = "auto" if device is None else str(device)
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not want.startswith("cuda"):
        raise DipuqError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if not torch.cuda.is_available():
        raise GPUUnavailableError("device 'cuda' requested but torch sees no CUDA device")
    n = torch.cuda.device_count()
    if want != "cuda":  # an explicit cuda:i wins over LOCAL_RANK
        return torch.device(want)
    if local_rank >= n:
        raise DistributedError(f"LOCAL_RANK {local_rank} but only {n} CUDA device(s) are visible on "
                               f"{socket.gethostname()}: start at most {n} processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed(
    backend: str = "auto",
    timeout_s: float = 600.0,
    device: str | torch.device | None = "auto",
    wait_timeout_s: float = 86400.0,
) -> DistContext:
    """Join the ``torchrun`` job this process belongs to, or return a single-process context.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. When they are
    absent (or ``WORLD_SIZE`` is 1) no process group is made and every collective is a no-op. If a
    process group already exists it is adopted (and not destroyed by :meth:`DistContext.shutdown`).

    Parameters
    ----------
    backend : "auto" | "gloo" | "nccl" | "cpu:gloo,cuda:nccl"
        "auto": NCCL for CUDA tensors plus gloo for objects when ``device`` is CUDA, else gloo.
    timeout_s : float
        Limit for forming the group and for each collective; a rank that crashed or hangs makes
        the others raise :class:`DistributedError` after at most this long.
    device : "auto" | "cpu" | "cuda" | torch.device
        "cuda"/"auto" on a GPU machine pick ``cuda:LOCAL_RANK`` and make it the current device.
    wait_timeout_s : float
        Limit for waiting on rank 0's work (:meth:`DistContext.on_main`), e.g. a long DIP fit.
    """
    global _MADE_GROUP
    if not timeout_s > 0 or not wait_timeout_s > 0:
        raise DipuqError(f"timeouts must be positive, got timeout_s={timeout_s}, wait_timeout_s={wait_timeout_s}")
    world = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", 0)
        return _make_current(DistContext(dist.get_rank(), dist.get_world_size(), local_rank,
                                         _resolve_device(device, local_rank), str(dist.get_backend()), timeout_s,
                                         wait_timeout_s, False))
    if world < 1:
        raise DistributedError(f"distributed launch: WORLD_SIZE={world} must be >= 1")
    if world == 1:
        local_rank = _env_int("LOCAL_RANK", 0)
        return _make_current(DistContext(0, 1, local_rank, _resolve_device(device, local_rank), None, timeout_s,
                                         wait_timeout_s, False))
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed support; run as a single process")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise DistributedError(f"distributed launch: WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set "
                               f"(launch with torchrun)")
    if not 0 <= rank < world:
        raise DistributedError(f"distributed launch: RANK={rank} is outside [0, WORLD_SIZE={world})")
    dev = _resolve_device(device, local_rank)
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl", "cpu:gloo,cuda:nccl"):
        raise DipuqError(f"distributed backend must be 'auto', 'gloo', 'nccl' or 'cpu:gloo,cuda:nccl', got {backend!r}")
    if "nccl" in backend and dev.type != "cuda":
        raise DipuqError(f"distributed backend {backend!r} needs CUDA devices; use 'gloo' on CPU")
    if "nccl" in backend and not dist.is_nccl_available():
        raise DipuqError("this torch build has no NCCL; use backend 'gloo'")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - rendezvous errors come in many types
        raise DistributedError(
            f"rank {rank} could not form the process group of {world} ranks at {addr}:{port} ({backend}) within "
            f"{timeout_s:g} s: {_first_line(exc)}"
        ) from exc
    _MADE_GROUP = True
    if not faulthandler.is_enabled():  # a rank killed in native code still names its Python frame
        faulthandler.enable()
    return _make_current(DistContext(rank, world, local_rank, dev, backend, timeout_s, wait_timeout_s, True))


def _make_current(ctx: DistContext) -> DistContext:
    """Make ``ctx``'s device the current CUDA device (if it is one) and ``ctx`` the :func:`current_context`."""
    global _CURRENT
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    _CURRENT = ctx
    return ctx


def made_process_group() -> bool:
    """True when :func:`init_distributed` formed a process group in this process (a torchrun rank).

    The command line then leaves with ``os._exit`` once its work is written and every rank has
    passed the closing barrier: the native gloo/NCCL threads' static destructors, run during
    interpreter teardown, can abort a rank that has already finished (SIGABRT, "terminate called
    without an active exception"), turning a successful job into a failed one.
    """
    return _MADE_GROUP
