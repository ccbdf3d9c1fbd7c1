"""The driver of the DIP fit: :func:`run_dip` runs :func:`dipuq.dip.fit.fit_dip` to the end.

The algorithm (:mod:`dipuq.dip.fit`) only yields states; everything that attaches from outside
lives here (STYLE 11): the progress bar, log lines, callbacks, checkpoints and resumption
(:mod:`dipuq.dip.checkpoint`), and the stage output :class:`DipResult` — the kept weights θ*
(as the network's full state, ``net_state``), the reconstruction f(θ*; z), the input z and the
fit's history.

The DIP's residual noise-variance estimate ``DipResult.residual_sigma2 = ||A f(θ*) − y||² / m``
(:func:`dipuq.dip.fit.residual_sigma2` with ``dof = 0``; the DIP's effective number of degrees of
freedom is unknown until the linearised model is built, and ``m − p`` is meaningless for an
over-parameterised network, p > m) is one *candidate* for the posterior's σ²; which σ² the
posterior uses is decided once, by :func:`dipuq.posterior.noise.decide_sigma2`.

Example (``net, A, y, cfg`` as in the :mod:`dipuq.dip.fit` example)::

    >>> result = run_dip(net, A, y, cfg, checkpoint="fit.ckpt")   # doctest: +SKIP
    >>> result.recon.shape                                         # doctest: +SKIP
    torch.Size([8, 8])
    >>> net = DipResult.load(result.save("dip.pt")).build_net()    # doctest: +SKIP

Run again with the same ``checkpoint`` and a finished fit returns at once; an interrupted one
continues where its last checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dipuq._io import save_torch
from dipuq.dip.checkpoint import load_checkpoint, save_checkpoint
from dipuq.dip.fit import DipConfig, DipState, FitHandle, check_fit_inputs, fit_dip, make_input, residual_sigma2
from dipuq.dip.networks import UNet
from dipuq.dip.tv import TVSelection, choose_tv_weight
from dipuq.errors import DipuqError

__all__ = ["DipResult", "resolve_tv", "run_dip"]

log = logging.getLogger("dipuq.dip")

_FORMAT = "dipuq.DipResult/2"  # 2: theta_map -> net_state, sigma2 -> residual_sigma2


@dataclass
class DipResult:
    """The output of the DIP stage.

    Attributes
    ----------
    net_state : the network's full state dict at θ* (all parameters and buffers; rebuild the net
        with :meth:`build_net`). The linearisation point ``theta_map`` of the later stages is the
        flat vector of its conv weights (:class:`dipuq.posterior.linearise.LinearisedModel`)
    recon : f(θ*; z), shape ``A.domain_shape``
    net_input : the fixed input z, shape ``(1, in_ch, *A.domain_shape)``
    network : ``UNet.spec()`` (rebuild with :meth:`build_net`)
    history : per-iterate ``loss``, ``misfit`` (mean squared residual), ``tv`` and, with held-out
        rows, ``val`` (their mean squared residual)
    best_iteration : index k of θ* in the history
    residual_sigma2 : ||A f(θ*) − y||² / m, the residual noise-variance estimate (module docstring)
    iterations : Adam steps taken
    stop_reason : ``"validation"`` (held-out loss stopped improving), ``"iterations"`` (the cap
        ``dip.iterations`` was reached: the fit may be unfinished), ``"time"`` (``dip.max_seconds``),
        ``"discrepancy"`` or ``"callback"``
    timings : ``total_s`` (wall time of the fit, summed over resumptions), ``per_iteration_s``
    config : the :class:`DipConfig` as a dict, ``gamma`` resolved (a number)
    tv : the held-out choice of the TV weight (:meth:`dipuq.dip.tv.TVSelection.to_dict`) when
        ``dip.gamma = "auto"`` or ``dip.input = "tv"`` made one, else empty
    """

    net_state: dict[str, torch.Tensor]
    recon: torch.Tensor
    net_input: torch.Tensor
    network: dict
    history: dict[str, list[float]]
    best_iteration: int
    residual_sigma2: float
    iterations: int
    stop_reason: str
    timings: dict[str, float]
    config: dict
    tv: dict = dataclasses.field(default_factory=dict)

    def build_net(self, device=None) -> UNet:
        """A :class:`UNet` holding θ* (dropout off)."""
        net = UNet.from_spec(self.network)
        dtype = next(iter(self.net_state.values())).dtype
        net = net.to(dtype=dtype, device=device)
        net.load_state_dict(self.net_state)
        return net

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (torch format, atomic)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["net_state"] = {k: v.detach().cpu() for k, v in self.net_state.items()}
        d["recon"], d["net_input"] = self.recon.detach().cpu(), self.net_input.detach().cpu()
        d["kind"] = _FORMAT
        return save_torch(d, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DipResult:
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DipuqError(f"cannot read DIP result {path}: {type(exc).__name__}: {exc}") from None
        kind = d.pop("kind", None) if isinstance(d, dict) else None
        if kind == "dipuq.DipResult":
            raise DipuqError(f"{path} was written by an older dipuq (DIP result format 1); refit the DIP (--force)")
        if kind != _FORMAT:
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
    warm: bool = False,
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
    warm : continue from ``net``'s current weights (see :func:`fit_dip`); needs ``x_input``
    """
    if warm and x_input is None:
        raise DipuqError("a warm-started DIP fit needs the network input x_input of the fit it continues")
    y, x_input = check_fit_inputs(net, A, y, x_input)
    ckpt = None
    if checkpoint is not None and Path(checkpoint).exists():
        ckpt = load_checkpoint(checkpoint)
        x_input = ckpt["x_input"].to(dtype=A.dtype, device=A.device)
        log.info("resuming DIP fit from %s at step %d", checkpoint, ckpt["steps"])
    tv = None
    if cfg.gamma == "auto" or (cfg.input == "tv" and x_input is None):
        cfg, tv = resolve_tv(cfg, A, y, validation)
    if x_input is None:
        in_ch = getattr(net, "in_ch", 1)
        if cfg.input == "tv":
            x_input = tv.x.reshape(1, 1, *A.domain_shape).expand(1, in_ch, *A.domain_shape).contiguous()
        else:
            x_input = make_input(A, y, cfg, generator, in_ch=in_ch)

    states = fit_dip(net, A, y, x_input, cfg, generator, resume=ckpt, validation=validation, warm=warm)
    finished = ckpt is not None and bool(ckpt.get("stop_reason"))
    t0 = time.perf_counter()
    bar = _progress_bar(cfg, ckpt["steps"] if ckpt is not None else 0) if progress else None
    try:
        if finished:
            states.close()  # finished fit: nothing to run
            fit, stop_reason = None, ckpt["stop_reason"]
        else:
            fit, stop_reason = _drive(states, cfg, checkpoint, list(callbacks), bar)
    finally:
        states.close()
        if bar is not None:
            bar.close()
    elapsed = float(ckpt.get("elapsed_s", 0.0)) if ckpt is not None else 0.0
    if fit is not None:  # else: resumed from a finished checkpoint, no time spent on the fit
        elapsed += time.perf_counter() - t0
    result = _result(net, A, y, x_input, cfg, fit, ckpt, stop_reason, elapsed)
    if tv is not None:
        result.tv = tv.to_dict()
    return result


def resolve_tv(cfg: DipConfig, A, y: torch.Tensor, validation: tuple | None = None) -> tuple[DipConfig, TVSelection]:
    """Choose the TV weight λ on held-out projections (:func:`~dipuq.dip.tv.select_tv_weight`)
    and return ``cfg`` with ``gamma`` resolved (``gamma_scale · λ`` when it was ``"auto"``) and the
    selection, whose ``x`` is the TV reconstruction of the fitted rows (the ``"tv"`` input).

    The held-out rows are ``validation`` when given (the pipeline's split); otherwise about 10 %
    of ``A``'s angles are held out for the choice only and the chosen weight is then solved on all
    rows. The PDHG start vectors come from a generator of their own (seed 0), so the caller's
    random stream is untouched and the choice is a pure function of (A, y, held-out rows).
    """
    sel = choose_tv_weight(A, y, validation, final_iter=300, generator=torch.Generator().manual_seed(0))
    gamma = cfg.gamma_scale * sel.lam if cfg.gamma == "auto" else cfg.gamma
    log.info("TV weight chosen on held-out projections: %g (DIP gamma %g)", sel.lam, gamma)
    return dataclasses.replace(cfg, gamma=float(gamma)), sel


def _progress_bar(cfg: DipConfig, start: int):
    from tqdm.auto import tqdm  # optional display dependency, needed only with progress=True

    return tqdm(total=cfg.iterations, initial=start, desc="DIP", unit="it", dynamic_ncols=True)


def _drive(states: Iterator[DipState], cfg: DipConfig, checkpoint, callbacks: list[Callback],
           bar) -> tuple[FitHandle | None, str]:
    """Consume the states of a fit: progress bar, log lines, callbacks, checkpoints.

    Returns the fit handle (None when there was no state to consume) and the stop reason.
    """
    fit, stop_reason = None, "iterations"
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
    return fit, stop_reason


def _result(net: UNet, A, y: torch.Tensor, x_input: torch.Tensor, cfg: DipConfig, fit: FitHandle | None,
            ckpt: dict | None, stop_reason: str, elapsed: float) -> DipResult:
    """Load the kept weights θ* into ``net`` and pack the :class:`DipResult` (from the fit handle,
    or from the checkpoint when the fit had finished before)."""
    if fit is not None:
        history, best_params, best_recon = fit.history, fit.best_params, fit.best_recon
        best_iteration, steps = fit.best_iteration, fit.steps
    else:
        history, best_recon = ckpt["history"], ckpt["best_recon"]
        best_params, best_iteration, steps = ckpt["best_params"], ckpt["best_iteration"], ckpt["steps"]
    dev = next(net.parameters()).device
    with torch.no_grad():
        own = dict(net.named_parameters())
        for k, v in best_params.items():
            own[k].copy_(v.to(dev))
    net.eval()
    recon = best_recon.to(device=A.device, dtype=A.dtype)
    return DipResult(
        net_state={k: v.detach().clone() for k, v in net.state_dict().items()},
        recon=recon,
        net_input=x_input.detach(),
        network=net.spec() if hasattr(net, "spec") else {},
        history={k: list(v) for k, v in history.items()},
        best_iteration=int(best_iteration),
        residual_sigma2=residual_sigma2(A, recon, y),
        iterations=int(steps),
        stop_reason=stop_reason,
        timings={"total_s": elapsed, "per_iteration_s": elapsed / max(1, steps)},
        config=cfg.to_dict(),
    )
