"""Run directories: atomic file writes, the output layout and per-stage checkpoints.

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

Example::

    >>> run = RunDir("runs/tooth")
    >>> if not run.is_done("dip", key):
    ...     result = fit(...); result.save(run.stage_path("dip", "dip.pt")); run.mark_done("dip", key)
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dipuq._io import atomic_path
from dipuq.errors import DipuqError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_npy",
    "atomic_save_tiff",
    "RunDir",
    "to_jsonable",
]


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
    import dataclasses

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
    import tifffile

    a = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    kw: dict[str, Any] = {"imagej": True, "metadata": {"axes": "ZYX" if a.ndim == 3 else "YX"}}
    if voxel_size:
        kw["resolution"] = (1.0 / voxel_size, 1.0 / voxel_size)
        if a.ndim == 3:
            kw["metadata"]["spacing"] = voxel_size
    buf = io.BytesIO()
    tifffile.imwrite(buf, a, **kw)
    return atomic_write_bytes(path, buf.getvalue())


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
        return self.root.is_dir() and any(self.root.iterdir())

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

    def mark_done(self, stage: str, key: str, **info: Any) -> None:
        """Record that ``stage`` finished with ``key`` (call after all its files are written)."""
        atomic_write_json(self.stage_path(stage, self.MARKER), {"stage": stage, "key": key, "finished": time.time(), **info})

    def invalidate(self, stage: str) -> None:
        """Forget ``stage`` and every later stage (their markers go first, then their files)."""
        later = self.stages[self.stages.index(stage):] if stage in self.stages else (stage,)
        for s in later:
            (self.stage_dir(s) / self.MARKER).unlink(missing_ok=True)
        for s in later:
            d = self.stage_dir(s)
            if d.exists():
                shutil.rmtree(d)

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
            if p.is_file() and (p.name in _OUTPUT_FILES or p.name.startswith(".") and ".tmp" in p.name):
                p.unlink()


_OUTPUT_FILES = {
    "config.toml", "config.yaml", "provenance.json", "recon.npy", "std.npy", "recon.tif", "std.tif",
    "metrics.json", "report.html", "request.json",
}
