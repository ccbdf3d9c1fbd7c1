"""Who made a run and from what: the request that identifies it, and ``provenance.json``.

The *request* — the scan's digest, the seed and the config's digest — is what a run directory
belongs to: :mod:`dipuq.run.resume` compares it to decide what a rerun may reuse. The
provenance record adds what made the numbers (versions, git commit, device, backend, threads,
command line, timings) without taking part in that decision. Experiments use the same
functions for their own records.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dipuq import __version__
from dipuq.data.scan import Scan
from dipuq.run.config import Config, config_digest, config_to_dict

__all__ = ["versions", "git_commit", "scan_digest", "request", "request_key", "record"]


def versions() -> dict[str, str]:
    """Versions of dipuq, Python and the libraries that shape the numbers (those installed)."""
    out = {"dipuq": __version__, "python": platform.python_version()}
    for dist in ("torch", "numpy", "scipy", "astra-toolbox", "tifffile", "matplotlib", "h5py"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the dipuq checkout in use (``+dirty`` with uncommitted changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def scan_digest(scan: Scan) -> str:
    """SHA-256 (16 hex) of a scan's projections, geometry and reference: its identity for resume."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(scan.projections).tobytes())
    h.update(json.dumps(scan.geometry.to_dict(), sort_keys=True, default=str).encode())
    if scan.reference is not None:
        h.update(np.ascontiguousarray(scan.reference).tobytes())
    h.update(repr(scan.noise_std).encode())
    return h.hexdigest()[:16]


def request(scan: Scan, config: Config, seed: int) -> dict:
    """What a run directory belongs to: scan digest and name, seed, config digest."""
    return {"scan": scan_digest(scan), "scan_name": scan.name, "seed": int(seed),
            "config": config_digest(config_to_dict(config))}


def request_key(req: dict) -> str:
    """The 16-hex key that finished stages of ``req`` record in their ``done.json``."""
    return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()[:16]


def record(ctx, backend: str | None, status: str, started: float, resumed: str | None) -> dict:
    """The ``provenance.json`` of the run in ``ctx`` (a :class:`~dipuq.run.context.RunContext`)."""
    scan = ctx.input_scan
    return {
        "dipuq_version": __version__,
        "status": status,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seed": ctx.seed,
        "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or platform.machine(),
        "backend": backend,
        "threads": torch.get_num_threads(),
        "resumed_from": resumed,
        "git_commit": git_commit(),
        "versions": versions(),
        "platform": platform.platform(),
        "scan": {"name": scan.name if scan is not None else None,
                 "digest": scan_digest(scan) if scan is not None else None,
                 "source": (scan.meta or {}).get("source") if scan is not None else None},
        "timings_s": dict(ctx.timings),
        "total_s": float(sum(ctx.timings.values())),
    }
