"""Deep image prior (DIP) reconstruction: θ* = argmin_θ ||A f(θ; z) − y||² + γ TV(f(θ; z)).

A U-Net ``f(θ; z)`` (:mod:`dipuq.dip.networks`) with a fixed input ``z`` (the FBP/FDK reconstruction by
default, or fixed noise) is fitted to the projections ``y`` through the ray transform ``A`` with
Adam. The iterate of lowest loss is kept (``theta_map``, the linearisation point of the later
stages). The algorithm is :func:`fit_dip`, a generator of :class:`DipState`; the driver
:func:`run_dip` consumes it and attaches the progress bar, logging, checkpoints and callbacks.

Loss normalisation (so that γ does not depend on the number of measurements or voxels)::

    loss(θ) = (1/m) ||A f(θ) − y||²  +  γ · TV(f(θ)),
    TV(x)   = (1/d) Σ_axes Σ_voxels |x[i + e_axis] − x[i]|      (anisotropic, forward differences)

i.e. the data term is the mean squared error per measurement (m = number of measurements) and the
TV term the mean absolute finite difference per voxel (d = number of voxels), summed over the 2 or
3 axes. Multiply γ by ``m / d`` to compare with the unnormalised form ``||Ax−y||² + γ' Σ|∇x|``.

Stopping: after ``cfg.iterations`` Adam steps, or (``cfg.stop = "discrepancy"``) as soon as the
discrepancy principle holds, ``||A f − y||² ≤ τ m σ²`` (equivalently misfit ≤ τ σ²), with σ² from
``cfg.sigma2`` or, when that is None, estimated from ``y`` by :func:`estimate_noise_sigma2`.

The noise variance handed to the posterior (``DipResult.sigma2``) is the residual estimate
``||A f(θ*) − y||² / (m − dof)`` (:func:`residual_sigma2`), with ``dof = 0`` by default: the DIP's
effective number of degrees of freedom is unknown until the linearised model is built (there it is
the effective dimension γ̂ of DESIGN §2), and ``m − p`` is meaningless for an over-parameterised
network (p > m). The posterior stage can re-estimate with ``dof = γ̂``.

Example::

    >>> from dipuq.operators import MatrixOperator
    >>> g = torch.Generator().manual_seed(0)
    >>> A = MatrixOperator(torch.randn(40, 64, generator=g) / 8, (8, 8), (40,))
    >>> y = A(torch.rand(8, 8, generator=g))                   # shape: A.range_shape
    >>> cfg = DipConfig(iterations=50, lr=3e-3, gamma=1e-2,
    ...                 network=NetworkConfig(scales=2, channels=4, skip_channels=1))
    >>> net = UNet.from_config(cfg.network, ndim=2, generator=g)
    >>> result = run_dip(net, A, y, cfg, generator=g)          # z = scaled Aᵀy (no geometry)
    >>> result.recon.shape
    torch.Size([8, 8])
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dipuq._io import save_torch
from dipuq.devices import check_same_device
from dipuq.errors import ConfigError, DataError, DipuqError, DivergenceError
from dipuq.dip.networks import NetworkConfig, UNet

__all__ = [
    "DipConfig",
    "DipState",
    "DipResult",
    "fit_dip",
    "run_dip",
    "make_input",
    "tv_anisotropic",
    "estimate_noise_sigma2",
    "residual_sigma2",
    "save_checkpoint",
    "load_checkpoint",
]

log = logging.getLogger("dipuq.dip.fit")

INPUTS = ("fbp", "noise")
STOPS = ("none", "discrepancy", "validation")
_CHECKPOINT_VERSION = 1
# config fields that may change between an interrupted fit and its resumption
_RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "log_every", "max_seconds")


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
@dataclass
class DipConfig:
    """Configuration of the DIP fit (one object per stage, STYLE 12).

    Parameters
    ----------
    iterations : maximum number of Adam steps (> 0)
    lr : Adam learning rate
    gamma : TV weight γ in the normalised loss (module docstring); 0 disables TV
    input : network input z: ``"fbp"`` (analytic reconstruction, the default) or ``"noise"``
    input_noise_std : std of the Gaussian noise input when ``input = "noise"``
    stop : ``"validation"`` (stop once the held-out projection loss has not improved for a
        patience window; keep the iterate of lowest held-out loss), ``"discrepancy"`` (stop once
        misfit ≤ τ σ²) or ``"none"`` (run ``iterations`` steps, keep the lowest-loss iterate)
    patience : validation stop: iterations without a held-out improvement before stopping …
    patience_rel : … or this fraction of the best iteration's index, whichever is larger (a fit
        that needed 2000 steps to reach its best gets a 1000-step window at 0.5)
    max_seconds : wall-clock cap of the fit in seconds (0 = none); stop reason ``"time"``
    fallback : what a run does when the FBP/FDK explains the held-out projections better than the
        DIP: ``"warn"`` (say so in the log, metrics.json and the report) or ``"error"`` (stop)
    tau : discrepancy factor τ (≥ 1 is the classical choice; 1.0 default)
    sigma2 : known noise variance of y (per measurement); None = estimate from y when needed
    checkpoint_every : write a checkpoint every N steps in :func:`run_dip` (0 = only at the end)
    log_every : log a line every N steps in :func:`run_dip` (0 = never)
    network : the U-Net's :class:`~dipuq.dip.networks.NetworkConfig`
    """

    iterations: int = 2000
    lr: float = 1e-3
    gamma: float = 1e-3
    input: str = "fbp"
    input_noise_std: float = 0.1
    stop: str = "validation"
    patience: int = 200
    patience_rel: float = 0.5
    max_seconds: float = 0.0
    fallback: str = "warn"
    tau: float = 1.0
    sigma2: float | None = None
    checkpoint_every: int = 0
    log_every: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self):
        if isinstance(self.network, dict):
            self.network = NetworkConfig.from_dict(self.network)
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations <= 0:
            raise ConfigError(f"dip.iterations must be a positive integer, got {self.iterations!r}")
        if not self.lr > 0:
            raise ConfigError(f"dip.lr must be > 0, got {self.lr!r}")
        if not self.gamma >= 0:
            raise ConfigError(f"dip.gamma (TV weight) must be >= 0, got {self.gamma!r}")
        if self.input not in INPUTS:
            raise ConfigError(f"dip.input must be one of {INPUTS}, got {self.input!r}")
        if not self.input_noise_std > 0:
            raise ConfigError(f"dip.input_noise_std must be > 0, got {self.input_noise_std!r}")
        if self.stop not in STOPS:
            raise ConfigError(f"dip.stop must be one of {STOPS}, got {self.stop!r}")
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 1:
            raise ConfigError(f"dip.patience must be a positive integer, got {self.patience!r}")
        if not self.patience_rel >= 0:
            raise ConfigError(f"dip.patience_rel must be >= 0, got {self.patience_rel!r}")
        if not self.max_seconds >= 0:
            raise ConfigError(f"dip.max_seconds must be >= 0 (0 = no limit), got {self.max_seconds!r}")
        if self.fallback not in ("warn", "error"):
            raise ConfigError(f"dip.fallback must be 'warn' or 'error', got {self.fallback!r}")
        if not self.tau > 0:
            raise ConfigError(f"dip.tau must be > 0, got {self.tau!r}")
        if self.sigma2 is not None and not (math.isfinite(self.sigma2) and self.sigma2 > 0):
            raise ConfigError(f"dip.sigma2 must be a positive number or None, got {self.sigma2!r}")
        for k in ("checkpoint_every", "log_every"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"dip.{k} must be an integer >= 0, got {v!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["network"] = self.network.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DipConfig:
        """Build from a plain dict (e.g. a config file section); unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown dip config keys {unknown}; allowed: {sorted(names)}")
        d = dict(d)
        if "network" in d and isinstance(d["network"], dict):
            d["network"] = NetworkConfig.from_dict(d["network"])
        return cls(**d)


# ----------------------------------------------------------------------------------------
# small maths helpers
# ----------------------------------------------------------------------------------------
def tv_anisotropic(x: torch.Tensor, ndim: int | None = None) -> torch.Tensor:
    """Mean anisotropic total variation TV(x) = (1/d) Σ_axes Σ |x[i + e_axis] − x[i]|.

    The differences run over the last ``ndim`` axes (default: all axes of ``x``); leading axes
    (batch, channel) are summed like voxels, and d is the number of elements of ``x``.
    """
    ndim = x.ndim if ndim is None else ndim
    total = x.new_zeros(())
    for ax in range(x.ndim - ndim, x.ndim):
        total = total + torch.diff(x, dim=ax).abs().sum()
    return total / x.numel()


def estimate_noise_sigma2(y: torch.Tensor) -> float:
    """Noise variance σ² of white Gaussian noise in projections y, estimated from y alone.

    Uses second differences along the detector columns (last axis),
    ``δ_i = y_{i+1} − 2 y_i + y_{i−1}``, whose variance is 6 σ² for white noise while a smooth
    sinogram contributes little; the robust scale ``1.4826 · MAD(δ)`` ignores the sparse large
    values at edges. Returns ``(1.4826 · MAD(δ))² / 6``.
    """
    d2 = (y[..., 2:] - 2 * y[..., 1:-1] + y[..., :-2]).reshape(-1).double()
    if d2.numel() < 3:
        raise DataError("cannot estimate the noise level: need at least 3 detector columns")
    mad = (d2 - d2.median()).abs().median()
    return float((1.4826 * mad) ** 2 / 6.0)


def residual_sigma2(A, x: torch.Tensor, y: torch.Tensor, dof: float = 0.0) -> float:
    """Residual noise-variance estimate σ² = ||A x − y||² / (m − dof)."""
    m = y.numel()
    if not 0 <= dof < m:
        raise DipuqError(f"degrees of freedom must be in [0, m={m}), got {dof}")
    with torch.no_grad():
        r = A(x) - y
    return float(r.double().square().sum() / (m - dof))


def make_input(A, y: torch.Tensor, cfg: DipConfig, generator: torch.Generator | None = None,
               in_ch: int = 1) -> torch.Tensor:
    """The fixed network input z, shape ``(1, in_ch, *A.domain_shape)``.

    ``cfg.input = "fbp"``: the analytic reconstruction ``dipuq.operators.recon.analytic(A, y)``
    (FBP / FDK by beam) when ``A`` carries a geometry; for a plain operator without one, the
    least-squares-scaled back-projection ``α Aᵀy`` with ``α = ||Aᵀy||² / ||A Aᵀ y||²``.
    ``cfg.input = "noise"``: ``input_noise_std · N(0, I)`` drawn from ``generator``.
    """
    shape = tuple(A.domain_shape)
    if cfg.input == "noise":
        z = torch.randn((1, in_ch, *shape), generator=generator, dtype=A.dtype, device="cpu")
        return (cfg.input_noise_std * z).to(A.device)
    with torch.no_grad():
        if getattr(A, "geometry", None) is not None:
            from dipuq.operators import recon

            x = recon.analytic(A, y)
        else:
            bp = A.T(y)
            abp = A(bp)
            x = bp * (bp.square().sum() / abp.square().sum().clamp_min(1e-30))
    x = x.reshape(shape).to(dtype=A.dtype, device=A.device)
    return x.expand(1, in_ch, *shape).contiguous()


# ----------------------------------------------------------------------------------------
# the algorithm
# ----------------------------------------------------------------------------------------
@dataclass
class _Fit:
    """Mutable bookkeeping of one DIP fit, shared by the states it yields (the "handle")."""

    net: UNet
    optimizer: torch.optim.Optimizer
    generator: torch.Generator | None
    x_input: torch.Tensor
    cfg: DipConfig
    sigma2_target: float | None
    history: dict[str, list[float]]
    best_loss: float = math.inf
    best_iteration: int = -1
    best_params: dict[str, torch.Tensor] = field(default_factory=dict)
    best_recon: torch.Tensor | None = None
    steps: int = 0  # Adam steps completed
    validation: tuple | None = None  # (A_H, y_H): held-out rows for the stop rule
    elapsed_s: float = 0.0  # wall time of earlier sessions of this fit (resume)


@dataclass
class DipState:
    """One iteration of :func:`fit_dip`.

    ``iteration`` is the index of the iterate θ_k whose ``loss``/``misfit``/``tv`` are reported;
    when the state is yielded, ``fit.steps`` Adam steps have been taken (k + 1 normally, k if the
    fit stopped at this iterate). ``recon`` is f(θ_k) (volume shape, detached, not copied);
    ``fit`` is the live handle to the network, optimiser, best snapshot and history (use it for
    checkpoints; do not mutate it). ``stop_reason`` is None while the fit runs.
    """

    iteration: int
    loss: float
    misfit: float
    tv: float
    best_loss: float
    best_iteration: int
    recon: torch.Tensor
    fit: _Fit
    stop_reason: str | None = None

    @property
    def best_params(self) -> dict[str, torch.Tensor]:
        return self.fit.best_params

    @property
    def best_recon(self) -> torch.Tensor | None:
        return self.fit.best_recon


def check_projections(A, y) -> torch.Tensor:
    """``y`` as a finite tensor of A's range shape (leading singleton dims dropped), A's dtype/device."""
    rng = tuple(A.range_shape)
    if isinstance(y, np.ndarray):
        y = torch.as_tensor(y)
    if not isinstance(y, torch.Tensor):
        raise DataError(f"projections y must be a torch.Tensor, got {type(y).__name__}")
    ys = tuple(y.shape)
    while len(ys) > len(rng) and ys[0] == 1:
        ys = ys[1:]
    if ys != rng:
        raise DataError(f"projections of shape {tuple(y.shape)} do not match the operator's range shape {rng}")
    y = y.reshape(rng).to(dtype=A.dtype, device=A.device)
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        raise DataError(f"projections contain {bad} NaN/inf values (of {y.numel()}); clean or mask them first")
    return y


def _check_inputs(net: UNet, A, y: torch.Tensor, x_input: torch.Tensor | None):
    dom = tuple(A.domain_shape)
    y = check_projections(A, y)
    if getattr(net, "ndim", len(dom)) != len(dom):
        raise ConfigError(f"network is {net.ndim}D but the operator's volume shape {dom} is {len(dom)}D")
    pdt = next(net.parameters()).dtype
    if pdt != A.dtype:
        raise ConfigError(f"network dtype {pdt} differs from the operator dtype {A.dtype}; use net.to({A.dtype})")
    check_same_device("fit_dip", net=net, A=A)  # y and x_input are moved to A's device below
    if x_input is not None:
        want = (1, getattr(net, "in_ch", 1), *dom)
        xs = tuple(x_input.shape)
        if xs == dom and want[1] == 1:
            x_input = x_input.reshape(want)
        elif xs != want:
            raise DataError(f"network input of shape {xs} does not match the volume: expected {want} or {dom}")
        x_input = x_input.to(dtype=A.dtype, device=A.device)
        if not torch.isfinite(x_input).all():
            raise DataError("network input contains NaN/inf values")
    return y, x_input


def fit_dip(
    net: UNet,
    A,
    y: torch.Tensor,
    x_input: torch.Tensor,
    cfg: DipConfig,
    generator: torch.Generator | None = None,
    *,
    resume: dict | None = None,
    validation: tuple | None = None,
) -> Iterator[DipState]:
    """Fit the DIP by Adam on the normalised loss; yields one :class:`DipState` per iterate.

    Parameters
    ----------
    net : the U-Net f(θ; ·), initialised (its weights are trained in place)
    A : LinearOperator, volume ``A.domain_shape`` -> projections ``A.range_shape``
    y : projections, shape ``A.range_shape`` (leading singleton dims allowed)
    x_input : network input z, shape ``(1, in_ch, *A.domain_shape)`` or ``A.domain_shape``
    cfg : :class:`DipConfig`
    generator : randomness of the fit (dropout masks when the net has dropout layers)
    resume : a checkpoint dict from :func:`load_checkpoint`; restores weights, Adam state,
        generator state, best iterate and history, and continues from the saved step
    validation : ``(A_H, y_H)``, the held-out rows (:mod:`dipuq.data.split`). Their loss
        ``(1/m_H) ||A_H f(θ_k) − y_H||²`` is recorded in ``history["val"]``; with
        ``cfg.stop = "validation"`` it selects the kept iterate and stops the fit. It is computed
        without gradients: the fit's parameters never depend on these rows. Without it a
        ``"validation"`` stop falls back to ``"none"``.

    At the end the network holds the *last* weights; the kept weights are in
    ``state.fit.best_params`` (``run_dip`` loads them).
    """
    y, x_input = _check_inputs(net, A, y, x_input)
    if x_input is None:
        raise DataError("fit_dip needs the network input x_input (see make_input)")
    sigma2_target = None
    if cfg.stop == "discrepancy":
        sigma2_target = cfg.sigma2 if cfg.sigma2 is not None else estimate_noise_sigma2(y)
    if validation is not None:
        A_H, y_H = validation
        validation = (A_H, check_projections(A_H, y_H))
    optimizer = _adam(net, cfg.lr)
    fit = _Fit(net, optimizer, generator, x_input, cfg, sigma2_target,
               history={"loss": [], "misfit": [], "tv": [], "val": []}, validation=validation)
    if resume is not None:
        _restore(fit, resume, y)
    return _fit_loop(fit, A, y)


def _adam(net, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where torch supports it (CPU and CUDA, torch >= 2.4): 5x faster steps."""
    try:
        return torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # device/dtype without a fused kernel
        return torch.optim.Adam(net.parameters(), lr=lr)


def validation_window(cfg: DipConfig, best_iteration: int) -> int:
    """Iterations without a held-out improvement after which the validation stop ends the fit."""
    return max(int(cfg.patience), int(math.ceil(cfg.patience_rel * max(best_iteration, 0))))


def _stop_reason(fit: _Fit, k: int, misfit: float) -> str | None:
    cfg = fit.cfg
    if fit.sigma2_target is not None and misfit <= cfg.tau * fit.sigma2_target:
        return "discrepancy"
    if cfg.stop == "validation" and fit.validation is not None:
        if k - fit.best_iteration >= validation_window(cfg, fit.best_iteration):
            return "validation"
    if cfg.max_seconds and fit.elapsed_s >= cfg.max_seconds:
        return "time"
    return None


def _fit_loop(fit: _Fit, A, y: torch.Tensor) -> Iterator[DipState]:
    net, opt, cfg = fit.net, fit.optimizer, fit.cfg
    params = [p for p in net.parameters()]
    names = [n for n, _ in net.named_parameters()]
    ndim = len(A.domain_shape)
    vol = tuple(A.domain_shape)
    by_val = cfg.stop == "validation" and fit.validation is not None
    dropout = getattr(net, "has_dropout", False)
    if dropout:
        net.set_dropout(True, fit.generator)  # MC-dropout training: masks on during the fit
    net.train()
    t_start, elapsed0 = time.perf_counter(), fit.elapsed_s
    try:
        for k in range(fit.steps, cfg.iterations):
            x = net(fit.x_input).reshape(vol)  # shape: domain_shape
            r = A(x) - y  # shape: range_shape
            misfit = r.square().mean()
            tv = tv_anisotropic(x, ndim) if cfg.gamma > 0 else x.new_zeros(())
            loss = misfit + cfg.gamma * tv
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lv, mv, tvv = loss.item(), misfit.item(), tv.item()
            if not math.isfinite(lv):
                raise DivergenceError(f"DIP loss became {lv} at iteration {k}; lower dip.lr")
            if fit.validation is not None:
                A_H, y_H = fit.validation
                with torch.no_grad():
                    fit.history["val"].append(float((A_H(x.detach()) - y_H).square().mean()))
            crit = fit.history["val"][-1] if by_val else lv
            if crit < fit.best_loss:
                fit.best_loss, fit.best_iteration = crit, k
                fit.best_params = {n: p.detach().clone() for n, p in zip(names, params)}
                fit.best_recon = x.detach().clone()
            fit.history["loss"].append(lv)
            fit.history["misfit"].append(mv)
            fit.history["tv"].append(tvv)
            fit.elapsed_s = elapsed0 + time.perf_counter() - t_start
            reason = _stop_reason(fit, k, mv)
            if reason == "discrepancy":  # this iterate satisfies the principle: keep it, take no step
                yield DipState(k, lv, mv, tvv, fit.best_loss, fit.best_iteration, x.detach(), fit,
                               stop_reason=reason)
                return
            opt.step()
            fit.steps = k + 1
            yield DipState(k, lv, mv, tvv, fit.best_loss, fit.best_iteration, x.detach(), fit, stop_reason=reason)
            if reason is not None:
                return
    finally:
        if dropout:
            net.set_dropout(False)


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, state: DipState) -> Path:
    """Write everything needed to resume the fit of ``state`` (atomically)."""
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


def _restore(fit: _Fit, ckpt: dict, y: torch.Tensor) -> None:
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


# ----------------------------------------------------------------------------------------
# result + driver
# ----------------------------------------------------------------------------------------
@dataclass
class DipResult:
    """The output of the DIP stage.

    Attributes
    ----------
    theta_map : state dict of the lowest-loss weights θ* (the linearisation point)
    recon : f(θ*; z), shape ``A.domain_shape``
    net_input : the fixed input z, shape ``(1, in_ch, *A.domain_shape)``
    network : ``UNet.spec()`` (rebuild with :meth:`build_net`)
    history : per-iterate ``loss``, ``misfit`` (mean squared residual), ``tv`` and, with held-out
        rows, ``val`` (their mean squared residual)
    best_iteration : index k of θ* in the history
    sigma2 : noise-variance estimate ||A f(θ*) − y||² / m (see module docstring)
    iterations : Adam steps taken
    stop_reason : ``"validation"`` (held-out loss stopped improving), ``"iterations"`` (the cap
        ``dip.iterations`` was reached: the fit may be unfinished), ``"time"`` (``dip.max_seconds``),
        ``"discrepancy"`` or ``"callback"``
    timings : ``total_s`` (wall time of the fit, summed over resumptions), ``per_iteration_s``
    config : the :class:`DipConfig` as a dict
    """

    theta_map: dict[str, torch.Tensor]
    recon: torch.Tensor
    net_input: torch.Tensor
    network: dict
    history: dict[str, list[float]]
    best_iteration: int
    sigma2: float
    iterations: int
    stop_reason: str
    timings: dict[str, float]
    config: dict

    def build_net(self, device=None) -> UNet:
        """A :class:`UNet` holding θ* (dropout off)."""
        net = UNet.from_spec(self.network)
        dtype = next(iter(self.theta_map.values())).dtype
        net = net.to(dtype=dtype, device=device)
        net.load_state_dict(self.theta_map)
        return net

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (torch format, atomic)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["theta_map"] = {k: v.detach().cpu() for k, v in self.theta_map.items()}
        d["recon"], d["net_input"] = self.recon.detach().cpu(), self.net_input.detach().cpu()
        d["kind"] = "dipuq.DipResult"
        return save_torch(d, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DipResult:
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DipuqError(f"cannot read DIP result {path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(d, dict) or d.pop("kind", None) != "dipuq.DipResult":
            raise DipuqError(f"{path} is not a saved dipuq DipResult")
        return cls(**d)


Callback = Callable[[DipState], "bool | None"]


def run_dip(
    net: UNet,
    A,
    y: torch.Tensor,
    cfg: DipConfig,
    *,
    x_input: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    checkpoint: str | os.PathLike | None = None,
    callbacks: Iterable[Callback] = (),
    progress: bool = False,
    validation: tuple | None = None,
) -> DipResult:
    """Run :func:`fit_dip` to the end and return a :class:`DipResult` (``net`` ends at θ*).

    Parameters
    ----------
    net, A, y, cfg, generator : as in :func:`fit_dip`
    x_input : network input; None = :func:`make_input` (FBP/FDK or noise per ``cfg.input``)
    checkpoint : file path. If it exists the fit resumes from it (a finished fit returns at
        once); it is (re)written every ``cfg.checkpoint_every`` steps and at the end.
    callbacks : called with each :class:`DipState`; returning True stops the fit
    progress : show a tqdm progress bar
    validation : ``(A_H, y_H)`` held-out rows for the validation stop (see :func:`fit_dip`)
    """
    y, x_input = _check_inputs(net, A, y, x_input)
    ckpt = None
    if checkpoint is not None and Path(checkpoint).exists():
        ckpt = load_checkpoint(checkpoint)
        x_input = ckpt["x_input"].to(dtype=A.dtype, device=A.device)
        log.info("resuming DIP fit from %s at step %d", checkpoint, ckpt["steps"])
    if x_input is None:
        x_input = make_input(A, y, cfg, generator, in_ch=getattr(net, "in_ch", 1))

    states = fit_dip(net, A, y, x_input, cfg, generator, resume=ckpt, validation=validation)
    fit: _Fit | None = None
    state: DipState | None = None
    stop_reason = ckpt["stop_reason"] if ckpt is not None and ckpt.get("stop_reason") else "iterations"
    callbacks = list(callbacks)
    t0 = time.perf_counter()
    start = ckpt["steps"] if ckpt is not None else 0
    elapsed0 = float(ckpt.get("elapsed_s", 0.0)) if ckpt is not None else 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, desc="DIP", unit="it", dynamic_ncols=True)
    try:
        if ckpt is not None and ckpt.get("stop_reason"):
            states.close()  # finished fit: nothing to run
        else:
            for state in states:
                fit = state.fit
                if bar is not None:
                    bar.update(1)
                    if state.iteration % 10 == 0:
                        bar.set_postfix(loss=f"{state.loss:.3e}", best=f"{state.best_loss:.3e}")
                if cfg.log_every and (state.iteration + 1) % cfg.log_every == 0:
                    log.info("DIP it %d loss %.4e misfit %.4e tv %.4e best %.4e@%d", state.iteration,
                             state.loss, state.misfit, state.tv, state.best_loss, state.best_iteration)
                stop = any(bool(cb(state)) for cb in callbacks) if callbacks else False
                if state.stop_reason is not None:
                    stop_reason = state.stop_reason
                elif stop:
                    stop_reason = state.stop_reason = "callback"
                last = state.stop_reason is not None or fit.steps >= cfg.iterations
                if checkpoint is not None and (last or (cfg.checkpoint_every and fit.steps % cfg.checkpoint_every == 0)):
                    save_checkpoint(checkpoint, state)
                if state.stop_reason is not None:
                    break
    finally:
        states.close()
        if bar is not None:
            bar.close()

    elapsed = elapsed0 + time.perf_counter() - t0
    if fit is not None:
        history, best_params, best_recon = fit.history, fit.best_params, fit.best_recon
        best_iteration, steps = fit.best_iteration, fit.steps
    else:  # resumed from a finished checkpoint
        history, best_recon = ckpt["history"], ckpt["best_recon"]
        best_params, best_iteration, steps = ckpt["best_params"], ckpt["best_iteration"], ckpt["steps"]
        elapsed = elapsed0
    dev = next(net.parameters()).device
    with torch.no_grad():
        own = dict(net.named_parameters())
        for k, v in best_params.items():
            own[k].copy_(v.to(dev))
    net.eval()
    recon = best_recon.to(device=A.device, dtype=A.dtype)
    sigma2 = residual_sigma2(A, recon, y)
    return DipResult(
        theta_map={k: v.detach().clone() for k, v in net.state_dict().items()},
        recon=recon,
        net_input=x_input.detach(),
        network=net.spec() if hasattr(net, "spec") else {},
        history={k: list(v) for k, v in history.items()},
        best_iteration=int(best_iteration),
        sigma2=sigma2,
        iterations=int(steps),
        stop_reason=stop_reason,
        timings={"total_s": elapsed, "per_iteration_s": elapsed / max(1, steps)},
        config=cfg.to_dict(),
    )
