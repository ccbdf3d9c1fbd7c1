"""Atomic file writes: a temporary file beside the target, flushed, then ``os.replace``.

The lowest layer of dipuq (imports only :mod:`dipuq.errors`), so every stage that saves a file —
scans, DIP checkpoints, posteriors, uncertainty maps, downloads, run directories — writes it the
same way: an interrupt leaves the old file or the new one, never half of one, and the new file
gets the usual permissions (``0666 & ~umask``), not ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dipuq.errors import DipuqError

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success it replaces ``path``.

    Use for writers that take a file name (``torch.save``, ``np.savez``, ``Scan.save``). On an
    exception the temporary file (or folder) is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers create it themselves (some refuse an existing file)
    tmp = Path(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise DipuqError(f"writer produced no file for {path.name}")
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.exists() and path.is_dir():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
