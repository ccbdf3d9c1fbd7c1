"""Run directories: the output layout, per-stage checkpoints and their integrity, the run lock.

A run directory is a folder of plain files that a reader (human, Fiji, napari, Python) can
open without dipuq::

    RUN/
      config.toml        resolved configuration (reload with --config RUN/config.toml)
      provenance.json    versions, git commit, seed, device, backend, timings, command line
      recon.npy std.npy  reconstruction and per-voxel posterior std, same shape as the volume
      recon.tif std.tif  the same as float32 ImageJ stacks
      metrics.json       metrics against the reference (only when the scan has one)
      figures/*.png      slice figures and diagnostics
      report.html        self-contained report
      stages/NN_name/    one checkpoint folder per stage, 'done.json' written last

Every file is written atomically (a temporary file in the same folder, flushed, then
``os.replace``), so an interrupt leaves either the old file or the new one, never half of one. A
stage is trusted on resume only when its ``done.json`` exists and records the same *key* (a
digest of everything the stage depends on); the marker is removed before a stage reruns, and the
stage's files are written before the marker.

Nothing in a run directory is trusted on its name alone:

- every stage's ``done.json`` records the SHA-256 of each file the stage wrote (its checkpoint
  files and the top-level outputs it produced, e.g. ``std.npy``); :meth:`RunDir.trusted_prefix`
  verifies them before a resume reads anything, and a missing, truncated or modified file makes
  that stage and every later one recompute (saying so);
- :class:`RunLock` holds an exclusive ``flock`` on ``RUN/.dipuq.lock`` (with the holder's PID
  inside) for the whole run, so a second process on the same directory fails at once, naming
  the PID, instead of mixing two runs' files. The kernel drops the lock when its holder dies,
  so a lock file left by a killed run is taken over (and reported as stale).

Example::

    >>> run = RunDir("runs/tooth")
    >>> if not run.is_done("dip", key):
    ...     result = fit(...); result.save(run.stage_path("dip", "dip.pt")); run.mark_done("dip", key)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from dipuq._io import atomic_write_json, sha256_file
from dipuq.errors import DipuqError

__all__ = ["RunDir", "RunLock"]

LOCK_FILE = ".dipuq.lock"


class RunDir:
    """A run directory with stage checkpoints (see the module docstring for the layout).

    Parameters
    ----------
    root : the run folder (created on demand)
    stages : stage names in pipeline order; each gets ``stages/NN_name/``
    """

    MARKER = "done.json"

    def __init__(self, root: str | Path, stages: Sequence[str] = ()):
        self.root = Path(root)
        self.stages = tuple(stages)

    # -- layout -------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def stage_dir(self, stage: str) -> Path:
        i = self.stages.index(stage) if stage in self.stages else len(self.stages)
        return self.root / "stages" / f"{i + 1:02d}_{stage}"

    def stage_path(self, stage: str, name: str) -> Path:
        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def exists(self) -> bool:
        return self.root.is_dir() and any(p.name != LOCK_FILE for p in self.root.iterdir())

    def create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise DipuqError(f"run directory {self.root} exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)

    # -- checkpoints --------------------------------------------------------------------
    def marker(self, stage: str) -> dict[str, Any] | None:
        """The stage's done record, or None if the stage has not (validly) finished."""
        p = self.stage_dir(stage) / self.MARKER
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def is_done(self, stage: str, key: str) -> bool:
        m = self.marker(stage)
        return m is not None and m.get("key") == key

    def mark_done(self, stage: str, key: str, *, before: dict | None = None, exclude: Sequence[str] = (),
                  **info: Any) -> None:
        """Record that ``stage`` finished with ``key`` (call after all its files are written).

        The marker lists the SHA-256 of every file in the stage's folder (but ``exclude``) and of
        every top-level output that is new or changed since the :meth:`snapshot` ``before``.
        """
        d = self.stage_dir(stage)
        names = [p for p in sorted(d.rglob("*")) if p.is_file() and p.name != self.MARKER
                 and p.relative_to(d).as_posix() not in exclude and not _is_tmp(p)] if d.is_dir() else []
        if before is not None:
            now = self.snapshot()
            names += [self.root / rel for rel, sig in now.items() if before.get(rel) != sig]
        files = {p.relative_to(self.root).as_posix(): sha256_file(p) for p in names}
        atomic_write_json(self.stage_path(stage, self.MARKER),
                          {"stage": stage, "key": key, "finished": time.time(), **info, "files": files})

    def rekey(self, stage: str, key: str) -> None:
        """Carry a finished stage over to a new request ``key`` (its files and checksums unchanged)."""
        m = self.marker(stage)
        if m is not None:
            atomic_write_json(self.stage_path(stage, self.MARKER), {**m, "key": key})

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """(mtime, size, inode) of the top-level outputs (everything outside ``stages/`` but the
        files rewritten on every run), to tell which of them a stage writes."""
        out = {}
        if not self.root.is_dir():
            return out
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            if rel.startswith("stages/") or rel in _VOLATILE or _is_tmp(p) or not p.is_file():
                continue
            st = p.stat()
            out[rel] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    def verify(self, stage: str) -> str | None:
        """None if every file ``stage``'s marker lists has its recorded SHA-256, else why not."""
        m = self.marker(stage)
        if m is None:
            return "it has no readable done.json"
        files = m.get("files")
        if not isinstance(files, dict):
            return "its done.json records no checksums (written by an older dipuq)"
        for rel, digest in files.items():
            p = self.root / rel
            try:
                ok = sha256_file(p) == digest
            except FileNotFoundError:
                return f"{rel} is missing"
            except OSError as exc:
                return f"{rel} is unreadable ({exc.strerror or type(exc).__name__})"
            if not ok:
                return f"{rel} does not match the checksum in its done.json (truncated or modified)"
        return None

    def trusted_prefix(self, done: Sequence[str], log=None) -> list[str]:
        """The finished stages of ``done`` (pipeline order) up to the first one whose files fail
        :meth:`verify`; that stage and every later one are forgotten (files removed), saying so."""
        out = []
        for s in self.stages:
            if s not in done:
                break
            why = self.verify(s)
            if why is not None:
                if log is not None:
                    log(f"dipuq: stage '{s}' cannot be trusted: {why}; recomputing '{s}' and the stages after it")
                self.invalidate(s)
                break
            out.append(s)
        return out

    def invalidate(self, stage: str) -> None:
        """Forget ``stage`` and every later stage (their markers go first, then their files)."""
        later = self.stages[self.stages.index(stage):] if stage in self.stages else (stage,)
        for s in later:
            (self.stage_dir(s) / self.MARKER).unlink(missing_ok=True)
        for s in later:
            d = self.stage_dir(s)
            if d.exists():
                shutil.rmtree(d)

    def remove_stale(self) -> list[str]:
        """Delete stage folders (``stages/NN_name``) that are not this pipeline's, e.g. left by a dipuq
        with another list of stages; returns their names."""
        base, own = self.root / "stages", {self.stage_dir(s).name for s in self.stages}
        stale = [d for d in base.iterdir() if d.is_dir() and _STAGE_DIR.fullmatch(d.name) and d.name not in own] \
            if base.is_dir() else []
        for d in stale:
            shutil.rmtree(d)
        return sorted(d.name for d in stale)

    def finished_stages(self) -> list[str]:
        return [s for s in self.stages if self.marker(s) is not None]

    def clear(self) -> None:
        """Remove everything dipuq writes in the run folder (``--force``); other files are kept."""
        if not self.root.exists():
            return
        for s in reversed(self.stages):
            (self.stage_dir(s) / self.MARKER).unlink(missing_ok=True)
        for name in ("stages", "figures"):
            if (self.root / name).is_dir():
                shutil.rmtree(self.root / name)
        for p in self.root.iterdir():
            if p.is_file() and (p.name in _OUTPUT_FILES or _is_tmp(p)):
                p.unlink()


_STAGE_DIR = re.compile(r"\d{2}_[a-z_]+")


def _is_tmp(p: Path) -> bool:
    return p.name.startswith(".") and ".tmp" in p.name


#: top-level files every run rewrites (not a stage's output, so not checksummed by one)
_VOLATILE = {"config.toml", "config.yaml", "provenance.json", LOCK_FILE}


class RunLock:
    """An exclusive lock on a run directory for the lifetime of one run (``with RunLock(root):``).

    ``flock`` on ``root/.dipuq.lock``; the holder writes its PID, host and start time into the
    file. A second holder gets a one-line :class:`DipuqError` naming that PID. The kernel
    releases the lock when its process exits in any way, so a lock file whose PID is dead is
    stale and taken over (``self.stale_pid`` says whose it was). A folder the lock itself had
    to create, and that holds nothing else on release, is removed again.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.fd: int | None = None
        self.stale_pid: int | None = None
        self._made_root = False

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return self
        if self.root.exists() and not self.root.is_dir():
            return self  # the caller reports "not a folder"
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self._made_root = True
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            pid = holder.get("pid")
            alive = pid is not None and _pid_alive(pid)
            who = (f"PID {pid}" + ("" if alive else ", which has exited; a child it started may still hold the lock")
                   + (f" on {holder['host']}" if holder.get("host") and holder.get("host") != socket.gethostname() else "")
                   if pid is not None else "an unknown process")
            raise DipuqError(f"run directory {self.root} is in use by another dipuq run ({who}); wait for it to "
                             "finish, or choose another --out") from None
        old = _read_holder(fd)
        if old.get("pid") is not None and old.get("pid") != os.getpid():
            self.stale_pid = old["pid"]
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        path = self.root / LOCK_FILE
        with contextlib.suppress(OSError):
            others = [p for p in self.root.iterdir() if p.name != LOCK_FILE]
            if not others:  # nothing was written: leave no trace of the attempt
                path.unlink()
                if self._made_root:
                    self.root.rmdir()
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return True
    return True


_OUTPUT_FILES = {
    "config.toml", "config.yaml", "provenance.json", "recon.npy", "std.npy", "recon.tif", "std.tif",
    "metrics.json", "report.html", "request.json",
}
