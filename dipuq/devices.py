"""Device errors: tensors on mixed devices, and one-line CUDA out-of-memory failures.

- :func:`check_same_device` turns tensors on mixed devices into one :class:`~dipuq.errors.DipuqError`
  that names both devices and the fix.
- :func:`oom_error` turns ``torch.cuda.OutOfMemoryError`` into a one-line
  :class:`~dipuq.errors.GPUOutOfMemoryError` naming the allocation that failed and the config
  keys that lower the memory of the stage it happened in.

What this machine can run (versions, backends, CUDA devices: ``dipuq info``) is
:func:`dipuq.commands.info.environment`.

Example::

    >>> raise oom_error(exc, stage="sampler")          # inside `except torch.cuda.OutOfMemoryError`
"""

from __future__ import annotations

import re

import torch

from dipuq.errors import DipuqError, GPUOutOfMemoryError

__all__ = ["check_same_device", "same_device", "oom_error", "is_oom", "OOM_KEYS"]

#: Config keys that lower the GPU memory of each pipeline stage, most effective first.
OOM_KEYS: dict[str, tuple[str, ...]] = {
    "scan": ("data.bin", "data.crop_rows", "data.vol_xy"),
    "fbp": ("data.bin", "data.vol_xy"),
    "dip": ("dip.network.channels", "dip.network.scales", "data.bin"),
    "linearise": ("linearise.chunk_size", "linearise.batching=loop", "linearise.diag_probes"),
    "posterior": ("posterior.em_samples", "sampler.chains_per_batch", "linearise.chunk_size",
                  "sampler.precond_memory_gb"),
    "sampler": ("sampler.chains_per_batch", "linearise.chunk_size", "sampler.precond_memory_gb"),
    "refit": ("dip.network.channels", "dip.network.scales", "data.bin"),
    "maps": ("data.bin",),
    "metrics": ("data.bin",),
}
_DEFAULT_KEYS = ("sampler.chains_per_batch", "linearise.chunk_size", "data.bin")


# --------------------------------------------------------------------------------------------
# mixed devices
# --------------------------------------------------------------------------------------------


def _norm(dev) -> torch.device:
    dev = torch.device(dev)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def same_device(a, b) -> bool:
    """True iff devices ``a`` and ``b`` are the same (``cuda`` = the current CUDA device)."""
    da, db = _norm(a), _norm(b)
    if da.type != db.type:
        return False
    return da.index == db.index or da.type != "cuda" or None in (da.index, db.index)


def check_same_device(where: str, **items) -> torch.device | None:
    """Raise one DipuqError unless every named tensor / module / device is on the same device.

    ``items`` maps a name (shown in the message) to a tensor, a ``torch.nn.Module`` (its first
    parameter), an object with a ``device`` attribute, or a device; ``None`` values are ignored.
    Returns the common device.
    """
    devs: dict[str, torch.device] = {}
    for name, obj in items.items():
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            p = next(iter(obj.parameters()), None)
            if p is None:
                continue
            dev = p.device
        elif isinstance(obj, (torch.device, str)):
            dev = torch.device(obj)
        else:
            dev = getattr(obj, "device", None)
            if dev is None:
                continue
        devs[name] = torch.device(dev)
    if not devs:
        return None
    first_name, first = next(iter(devs.items()))
    for name, dev in devs.items():
        if not same_device(first, dev):
            listing = ", ".join(f"{n} on {d}" for n, d in devs.items())
            raise DipuqError(f"{where}: inputs are on different devices ({listing}); move them to one device "
                             f"first, e.g. net.to({str(first)!r}) / tensor.to({str(first)!r})")
    return first


# --------------------------------------------------------------------------------------------
# out of memory
# --------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    """True for torch's CUDA out-of-memory error (and the RuntimeErrors older builds raised)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


_TRIED = re.compile(r"[Tt]ried to allocate\s+([\d.]+\s*[KMGT]?i?B)")
_GPU = re.compile(r"GPU\s+(\d+)\s+has a total capacity of\s+([\d.]+\s*[KMGT]?i?B)")
_FREE = re.compile(r"of which\s+([\d.]+\s*[KMGT]?i?B)\s+is free")


def oom_error(exc: BaseException, stage: str | None = None, what: str | None = None) -> GPUOutOfMemoryError:
    """A one-line :class:`GPUOutOfMemoryError` for a CUDA out-of-memory ``exc``.

    Names the allocation that failed (from torch's message), the device's capacity and free
    memory when torch reports them, ``what`` was being computed (e.g. the volume size), the
    stage, and the config keys that lower that stage's memory (:data:`OOM_KEYS`).
    """
    msg = str(exc)
    size = _TRIED.search(msg)
    gpu = _GPU.search(msg)
    free = _FREE.search(msg)
    parts = ["CUDA out of memory"]
    if stage:
        parts[0] += f" in stage '{stage}'"
    if what:
        parts[0] += f" ({what})"
    detail = []
    if size:
        detail.append(f"allocating {size.group(1)} failed")
    if gpu:
        detail.append(f"GPU {gpu.group(1)} holds {gpu.group(2)}" + (f", {free.group(1)} free" if free else ""))
    text = parts[0] + (": " + "; ".join(detail) if detail else "")
    keys = OOM_KEYS.get(stage or "", _DEFAULT_KEYS)
    text += f"; lower it with --set {keys[0]}=<smaller>" if "=" not in keys[0] else f"; lower it with --set {keys[0]}"
    if len(keys) > 1:
        text += f" (or {', '.join(keys[1:])})"
    text += ", or run on a bigger GPU / --device cpu"
    return GPUOutOfMemoryError(" ".join(text.split()))
