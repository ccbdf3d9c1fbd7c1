"""``dipuq info [--json]``: this machine as dipuq sees it, for bug reports.

:func:`environment` is the machine's description a user pastes into a bug report (what
``dipuq info`` prints): versions, the projector backends usable here, torch's CUDA devices,
thread settings, the data cache and mirror. It never calls an ASTRA CUDA function unless torch
sees a CUDA device and ASTRA reports its CUDA backend usable (without one, ASTRA's 3D and CUDA
calls kill the process with SIGFPE).

Example::

    >>> info = environment()
    >>> info["backends"]["usable"]                     # e.g. ['astra-cpu', 'cpu-cone'] on a laptop
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from dipuq import __version__
from dipuq.data.registry import DATASETS, cache_path
from dipuq.errors import DipuqError
from dipuq.geometry import Geometry
from dipuq.operators import _astra, available_backends
from dipuq.operators.ray import BACKENDS

__all__ = ["environment", "format_environment"]

DESCRIPTION = """\
Print what a bug report needs: dipuq, Python and library versions; the projector backends usable
on this machine (ASTRA CPU, ASTRA CUDA, dipuq's cpu-cone) and which one 'auto' picks; torch's CUDA
build and devices (name, memory); thread settings; the data cache and mirror folders and which
registered datasets they hold.

Safe on any machine: ASTRA's CUDA functions are only probed when torch sees a CUDA device.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="versions, usable backends, GPUs, threads, data folders (for bug reports)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    info = environment()
    print(json.dumps(info, indent=2) if args.json else format_environment(info))
    return 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gib(n: float) -> float:
    return round(float(n) / 2**30, 2)


def _cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        try:
            p = torch.cuda.get_device_properties(i)
            dev = {"index": i, "name": p.name, "memory_gib": _gib(p.total_memory),
                   "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
            try:
                free, total = torch.cuda.mem_get_info(i)
                dev["free_gib"] = _gib(free)
            except RuntimeError:  # a device busy in exclusive mode
                pass
        except Exception as exc:  # noqa: BLE001 - a probe must never crash
            dev = {"index": i, "error": f"{type(exc).__name__}: {exc}"}
        out.append(dev)
    return out


def _astra_facts() -> dict:
    facts: dict = {"version": None, "cuda_usable": False}
    try:
        facts["version"] = _astra.astra_version()
    except DipuqError as exc:
        facts["error"] = str(exc)
        return facts
    if not torch.cuda.is_available():
        facts["cuda_note"] = "not probed: torch sees no CUDA device (ASTRA's CUDA calls would kill the process)"
        return facts
    facts["cuda_usable"] = _astra.cuda_available()
    if facts["cuda_usable"]:
        facts["gpu_info"] = _astra.gpu_info()
    else:
        facts["cuda_note"] = "torch sees a CUDA device but astra.use_cuda() is False (a CPU-only ASTRA build?)"
    return facts


def _threads() -> dict:
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "CUDA_VISIBLE_DEVICES") if k in os.environ}
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    return {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
            "cpus_usable": cpus, "env": env}


def _data_folders() -> dict:
    cache = cache_path()
    mirror = os.environ.get("DIPUQ_DATA_MIRROR") or None
    datasets = {}
    for name, ds in DATASETS.items():
        where = []
        for label, root in (("mirror", Path(mirror) if mirror else None), ("cache", cache)):
            if root is not None and all((root / f.path).is_file() for f in ds.files):
                where.append(label)
        datasets[name] = where or ["not present (dipuq data fetch " + name + ")"]
    return {"cache": str(cache), "cache_exists": cache.is_dir(),
            "mirror": mirror, "mirror_exists": bool(mirror) and Path(mirror).is_dir(), "datasets": datasets}


def environment() -> dict:
    """This machine as dipuq sees it: versions, backends, CUDA devices, threads, data folders.

    A JSON-serialisable dict. Safe on any machine: ASTRA's CUDA functions are reached only
    when torch sees a CUDA device and ``astra.use_cuda()`` is True.
    """
    astra = _astra_facts()
    usable = available_backends()
    return {
        "dipuq": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {k: _version(k) for k in ("torch", "numpy", "scipy", "astra-toolbox", "tifffile", "h5py",
                                              "matplotlib", "odl")},
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(),
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  "nccl": _nccl_version(), "devices": _cuda_devices()},
        "astra": astra,
        "backends": {"usable": usable, "all": list(BACKENDS), "auto": _auto_choices()},
        "threads": _threads(),
        "data": _data_folders(),
    }


def _auto_choices() -> dict:
    """What ``backend="auto"`` picks here for each kind of geometry (tiny probes, nothing built)."""
    ang = np.linspace(0, np.pi, 4, endpoint=False)
    probes = {"2d parallel": Geometry.parallel2d(ang, (8, 8)),
              "3d parallel": Geometry.parallel3d(ang, (8, 8, 8)),
              "3d cone": Geometry.cone3d(ang, (8, 8, 8), (8, 12), source_origin=32.0, origin_detector=16.0)}
    out = {}
    for name, g in probes.items():
        ok = available_backends(g)
        out[name] = ok[0] if ok else None
    return out


def _nccl_version() -> str | None:
    try:
        if not torch.cuda.is_available():
            return None
        v = torch.cuda.nccl.version()
        return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001 - a build without NCCL
        return None


def format_environment(info: dict) -> str:
    """:func:`environment` as the aligned text block ``dipuq info`` prints."""
    t, a, th, data = info["torch"], info["astra"], info["threads"], info["data"]
    lines = [f"dipuq        {info['dipuq']}  (Python {info['python']}, {info['platform']})"]
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v is not None)
    lines.append(f"packages     {vers}")
    cuda = f"CUDA {t['cuda_build']}" if t["cuda_build"] else "CPU-only build"
    lines.append(f"torch        {t['version']} ({cuda}); CUDA device available: {'yes' if t['cuda_available'] else 'no'}"
                 + (f"; cuDNN {t['cudnn']}" if t["cudnn"] else "") + (f"; NCCL {t['nccl']}" if t["nccl"] else ""))
    for d in t["devices"]:
        if "error" in d:
            lines.append(f"  cuda:{d['index']}     {d['error']}")
        else:
            free = f", {d['free_gib']} GiB free" if "free_gib" in d else ""
            lines.append(f"  cuda:{d['index']}     {d['name']}, {d['memory_gib']} GiB{free}, compute {d['capability']}")
    astra_line = f"ASTRA {a['version']}" if a.get("version") else f"ASTRA not importable: {a.get('error')}"
    astra_line += f"; CUDA backend usable: {'yes' if a['cuda_usable'] else 'no'}"
    if a.get("cuda_note"):
        astra_line += f" ({a['cuda_note']})"
    lines.append(f"astra        {astra_line}")
    if a.get("gpu_info"):
        lines.append(f"  astra gpu  {a['gpu_info']}")
    b = info["backends"]
    lines.append(f"backends     usable here: {', '.join(b['usable']) or 'none'} (all: {', '.join(b['all'])})")
    lines.append("  auto picks " + ", ".join(f"{k}: {v}" for k, v in b["auto"].items()))
    env = " ".join(f"{k}={v}" for k, v in th["env"].items()) or "no thread variables set"
    lines.append(f"threads      torch intra-op {th['torch_intra_op']}, inter-op {th['torch_inter_op']}, "
                 f"{th['cpus_usable']} CPUs usable; {env}")
    lines.append(f"data cache   {data['cache']}" + ("" if data["cache_exists"] else " (not created yet)")
                 + "  ($DIPUQ_CACHE)")
    mirror = data["mirror"] or "not set"
    if data["mirror"] and not data["mirror_exists"]:
        mirror += " (folder does not exist)"
    lines.append(f"data mirror  {mirror}  ($DIPUQ_DATA_MIRROR)")
    for name, where in data["datasets"].items():
        lines.append(f"  {name:<15}{', '.join(where)}")
    return "\n".join(lines)
