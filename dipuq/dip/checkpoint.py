"""Checkpoints of a running DIP fit: everything :func:`dipuq.dip.fit.fit_dip` needs to continue.

A checkpoint is a torch file holding a plain dict: the step count, the network's and Adam's
state, the generator state, the network input z, the config, the discrepancy target, the loss
history and the lowest-loss snapshot. Resuming from it continues the fit bit for bit: a fit
interrupted and resumed gives the same θ* as one run straight through (``tests/test_dip.py``).
The driver :func:`dipuq.dip.driver.run_dip` writes and reads them; the algorithm only restores.

Example::

    >>> states = fit_dip(net, A, y, z, cfg)                  # doctest: +SKIP
    >>> save_checkpoint("fit.ckpt", next(states))             # doctest: +SKIP
    >>> fit_dip(net, A, y, z, cfg, resume=load_checkpoint("fit.ckpt"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dipuq._io import save_torch
from dipuq.errors import ConfigError, DataError, DipuqError

__all__ = ["save_checkpoint", "load_checkpoint", "restore"]

_CHECKPOINT_VERSION = 1
# config fields that may change between an interrupted fit and its resumption
_RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "log_every", "max_seconds")


def save_checkpoint(path: str | os.PathLike, state) -> Path:
    """Write everything needed to resume the fit of ``state`` (a ``DipState``), atomically."""
    fit = state.fit
    ckpt = {
        "version": _CHECKPOINT_VERSION,
        "steps": fit.steps,
        "net": {k: v.detach().clone() for k, v in fit.net.state_dict().items()},
        "net_spec": fit.net.spec() if hasattr(fit.net, "spec") else None,
        "optimizer": fit.optimizer.state_dict(),
        "generator": fit.generator.get_state() if fit.generator is not None else None,
        "x_input": fit.x_input.detach().cpu(),
        "config": fit.cfg.to_dict(),
        "sigma2_target": fit.sigma2_target,
        "history": {k: list(v) for k, v in fit.history.items()},
        "best_loss": fit.best_loss,
        "best_iteration": fit.best_iteration,
        "best_params": {k: v.cpu() for k, v in fit.best_params.items()},
        "best_recon": None if fit.best_recon is None else fit.best_recon.cpu(),
        "stop_reason": state.stop_reason,
        "elapsed_s": fit.elapsed_s,
    }
    return save_torch(ckpt, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated / not a checkpoint
        raise DipuqError(f"cannot read DIP checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != _CHECKPOINT_VERSION:
        raise DipuqError(f"{path} is not a dipuq DIP checkpoint (version {_CHECKPOINT_VERSION})")
    return ckpt


def restore(fit, ckpt: dict) -> None:
    """Load checkpoint ``ckpt`` into the fit handle ``fit`` (a fresh ``fit_dip`` bookkeeping
    record with the same config, apart from :data:`_RESUMABLE_CHANGES`, and input shape)."""
    old, new = dict(ckpt["config"]), fit.cfg.to_dict()
    for k in _RESUMABLE_CHANGES:
        old.pop(k, None)
        new.pop(k, None)
    if old != new:
        diff = sorted(k for k in new if old.get(k) != new.get(k))
        raise ConfigError(f"checkpoint was written with a different DIP config (fields {diff}); delete it or restore the config")
    dev, dt = fit.x_input.device, fit.x_input.dtype
    if tuple(ckpt["x_input"].shape) != tuple(fit.x_input.shape):
        raise DataError(f"checkpoint network input {tuple(ckpt['x_input'].shape)} does not match {tuple(fit.x_input.shape)}")
    fit.net.load_state_dict(ckpt["net"])
    fit.optimizer.load_state_dict(ckpt["optimizer"])
    if fit.generator is not None and ckpt["generator"] is not None:
        fit.generator.set_state(ckpt["generator"])
    fit.x_input = ckpt["x_input"].to(device=dev, dtype=dt)
    fit.sigma2_target = ckpt["sigma2_target"]
    fit.history = {k: list(v) for k, v in ckpt["history"].items()}
    fit.best_loss, fit.best_iteration = ckpt["best_loss"], ckpt["best_iteration"]
    fit.best_params = {k: v.to(dev) for k, v in ckpt["best_params"].items()}
    fit.best_recon = None if ckpt["best_recon"] is None else ckpt["best_recon"].to(dev)
    fit.steps = int(ckpt["steps"])
    fit.history.setdefault("val", [])
    fit.elapsed_s = float(ckpt.get("elapsed_s", 0.0))
