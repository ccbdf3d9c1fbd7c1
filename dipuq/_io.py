"""Every file dipuq writes, written atomically: a temporary file beside the target, flushed, then
``os.replace``; and the one way to read a torch checkpoint back.

The lowest layer of dipuq (imports only :mod:`dipuq.errors`), so every stage that saves a file —
scans, DIP checkpoints, posteriors, uncertainty maps, downloads, run directories — writes it the
same way: an interrupt leaves the old file or the new one, never half of one, and the new file
gets the usual permissions (``0666 & ~umask``), not ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dipuq.errors import DipuqError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_npy",
           "atomic_save_tiff", "save_torch", "load_torch", "sha256_file", "to_jsonable"]


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values from numpy/torch scalars and arrays, paths, tuples and dataclasses."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch tensor
        return to_jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | Path, array) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_tiff(path: str | Path, array, *, voxel_size: float | None = None) -> Path:
    """A float32 ImageJ hyperstack (2D image or 3D z-stack) that Fiji and napari open directly."""
    import tifffile  # heavy: imported only when a TIFF is written

    a = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    kw: dict[str, Any] = {"imagej": True, "metadata": {"axes": "ZYX" if a.ndim == 3 else "YX"}}
    if voxel_size:
        kw["resolution"] = (1.0 / voxel_size, 1.0 / voxel_size)
        if a.ndim == 3:
            kw["metadata"]["spacing"] = voxel_size
    buf = io.BytesIO()
    tifffile.imwrite(buf, a, **kw)
    return atomic_write_bytes(path, buf.getvalue())


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save`` of ``obj`` to ``path``, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_torch(path: str | Path, what: str = "checkpoint"):
    """Read a file written by :func:`save_torch` (tensors and plain values only, on the CPU); a
    damaged or foreign file is one :class:`DipuqError` line naming ``what`` and the path."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or not a torch file: say which file, suggest --force
        raise DipuqError(f"cannot read {what} {path} ({type(exc).__name__}); rerun with --force") from None
