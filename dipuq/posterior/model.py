"""Gaussian posterior of the linearised DIP under the g-prior.

Model (DESIGN.md §2). Conv weights θ = θ* + s ⊙ w with the g-prior w ~ N(w_c, g I); the image is
x = f(θ*) + J̃ w with J̃ = J diag(s); the data y = A x + η, η ~ N(0, σ² I). The posterior over w
is Gaussian with precision

    H = σ⁻² J̃ᵀAᵀAJ̃ + g⁻¹ I                              (p × p)

and the image predictive covariance is J̃ H⁻¹ J̃ᵀ. The predictive mean is the DIP reconstruction
f(θ*) (``model.mean``); the linear-model mean f(θ*) + J̃ w̄ is available from the samplers.

The g-prior scales s come from :func:`dipuq.posterior.gprior.gprior_scale`; the noise variance σ²
is required, decided once by :func:`dipuq.posterior.noise.decide_sigma2`.

Prior centre (``prior_center``): ``"zero"`` centres the weight prior at θ = 0 as in linearised
Laplace (w_c = −θ*/s; sample-based EM for g is then informative), ``"map"`` centres it at θ*
(w_c = 0). The posterior covariance, hence every std map, does not depend on this choice.

Example::

    >>> post = Posterior(model, A, y, sigma2=0.01, g=1.0)          # doctest: +SKIP
    >>> post.H(torch.randn(4, post.p)).shape                        # doctest: +SKIP
    torch.Size([4, p])
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch

from dipuq._io import save_torch
from dipuq.devices import check_same_device
from dipuq.errors import DipuqError
from dipuq.operators.base import DiagonalOperator, IdentityOperator, LinearOperator
from dipuq.posterior.gprior import gprior_scale
from dipuq.posterior.linearise import LinearisedModel

__all__ = ["Posterior", "Jacobian"]

_FORMAT = "dipuq.posterior/1"


class Posterior:
    """The Gaussian posterior N(w̄, H⁻¹) of the rescaled linearised-DIP weights w.

    Parameters
    ----------
    model : LinearisedModel
        J at θ* and the DIP reconstruction ``model.mean`` = f(θ*).
    A : LinearOperator
        Forward operator, ``A.domain_shape == model.image_shape``.
    y : Tensor
        Measured data, shape ``A.range_shape`` (a leading ``(1,)`` or ``(1, 1)`` is dropped).
    sigma2 : float
        Noise variance σ² of y, required (decide it with
        :func:`dipuq.posterior.noise.decide_sigma2`).
    g : float
        Prior variance of w.
    scale : Tensor, optional
        g-prior scales s, shape ``(p,)``. Default: :func:`gprior_scale` with ``n_probes`` probes
        drawn from ``generator`` (a fixed-seed local generator when not given).
    prior_center : "zero" | "map"
        Where the weight prior is centred (see module docstring).
    """

    def __init__(
        self,
        model: LinearisedModel,
        A,
        y: torch.Tensor,
        sigma2: float,
        g: float = 1.0,
        scale: torch.Tensor | None = None,
        prior_center: str = "zero",
        n_probes: int | None = 128,
        generator: torch.Generator | None = None,
    ):
        if tuple(A.domain_shape) != tuple(model.image_shape):
            raise DipuqError(f"operator domain {A.domain_shape} != model image shape {model.image_shape}")
        if prior_center not in ("zero", "map"):
            raise DipuqError(f"prior_center must be 'zero' or 'map', got {prior_center!r}")
        check_same_device("Posterior", model=model, A=A)
        self.model, self.A = model, A
        self.m, self.d = A.shape
        self.p = model.p
        y = torch.as_tensor(y, dtype=model.dtype, device=model.device)
        if y.numel() != self.m:
            raise DipuqError(f"data y has {y.numel()} values, operator range {A.range_shape} needs {self.m}")
        self.y = y.reshape(A.range_shape)  # shape: range_shape
        if not torch.isfinite(self.y).all():
            raise DipuqError("data y contains NaN or inf")
        with torch.no_grad():
            self.residual_map = self.y - A(model.mean)  # y − A f(θ*), shape: range_shape
        if sigma2 is None:
            raise DipuqError("Posterior needs the noise variance sigma2 (see dipuq.posterior.noise.decide_sigma2)")
        self.sigma2 = float(sigma2)
        if not (self.sigma2 > 0 and math.isfinite(self.sigma2)):
            raise DipuqError(f"noise variance sigma2 must be positive and finite, got {self.sigma2}")
        self.g = float(g)
        if not (self.g > 0 and math.isfinite(self.g)):
            raise DipuqError(f"prior variance g must be positive and finite, got {self.g}")
        if scale is None:
            if generator is None:
                generator = torch.Generator(device=model.device).manual_seed(0)
            scale = gprior_scale(model, A, n_probes=n_probes, generator=generator)
        scale = torch.as_tensor(scale, dtype=model.dtype, device=model.device).reshape(-1)
        if scale.numel() != self.p:
            raise DipuqError(f"scale has {scale.numel()} entries, the model has p = {self.p} weights")
        self.scale = scale  # shape: (p,)
        self.prior_center = prior_center
        if prior_center == "zero":
            self.w_center = -model.theta_map / self.scale  # shape: (p,)
        else:
            self.w_center = torch.zeros_like(model.theta_map)
        self.cache: dict = {}  # g-independent derived quantities (λmax, preconditioners, dense J̃)

    def weight_scale_g(self) -> float:
        """A data-driven prior variance: mean((θ*/s)²), the fitted weights' size in g-prior units.

        With the prior centred at θ = 0 the EM update is g ← ||u||²/γ, where u ≈ the part of
        w_c = −θ*/s that the data determine; if θ*/s were spread evenly over directions, that part
        would have squared norm ≈ (γ/p)||w_c||², so g ≈ ||w_c||²/p = mean((θ*/s)²). A starting
        point for EM, not its answer: on the 24³ demo (1.17e-3) three cg EM rounds stayed within
        0.82e-3–1.2e-3, on 2D Shepp–Logan 128² one round moved g from 0.040 to 1.4e-3. From g = 1
        the first EM round costs minutes (ill-conditioned). 1.0 when θ* is zero.
        """
        g = float((self.model.theta_map.double() / self.scale.double()).pow(2).mean())
        return g if g > 0 and math.isfinite(g) else 1.0

    # -- J̃, A J̃, H and K + σ²I as composed operators ----------------------------------------
    @functools.cached_property
    def J(self) -> LinearOperator:
        """J̃ = J diag(s): weights ``(*batch, p)`` -> images ``(*batch, *image_shape)``; ``J.T`` is J̃ᵀ."""
        return Jacobian(self.model) @ DiagonalOperator(self.scale)

    @functools.cached_property
    def AJ(self) -> LinearOperator:
        """A J̃: weights ``(*batch, p)`` -> data ``(*batch, *range_shape)``; ``AJ.T`` is J̃ᵀAᵀ."""
        return self.A @ self.J

    @property
    def H(self) -> LinearOperator:
        """The posterior precision H = σ⁻² J̃ᵀAᵀAJ̃ + g⁻¹ I on ``(*batch, p)`` (at the current g, σ²)."""
        eye = IdentityOperator((self.p,), self.model.dtype, self.model.device)
        return self.AJ.normal() / self.sigma2 + eye / self.g

    @property
    def kernel(self) -> LinearOperator:
        """The dual system's matrix K + σ² I, K = g A J̃ J̃ᵀ Aᵀ, on ``(*batch, *range_shape)``."""
        eye = IdentityOperator(self.A.range_shape, self.model.dtype, self.model.device)
        return self.g * (self.AJ @ self.AJ.T) + self.sigma2 * eye

    @property
    def data_residual(self) -> torch.Tensor:
        """r = y − A f(θ*) − A J̃ w_c: the data the zero-centred offset u = w − w_c must explain."""
        if self.prior_center == "map":
            return self.residual_map
        return self.residual_map - self.AJ(self.w_center)

    def with_g(self, g: float) -> Posterior:
        """A shallow copy with another prior variance g (same model, A, y, σ², s)."""
        new = object.__new__(Posterior)
        new.__dict__.update(self.__dict__)
        new.g = float(g)
        if not (new.g > 0 and math.isfinite(new.g)):
            raise DipuqError(f"prior variance g must be positive and finite, got {g}")
        return new

    # -- dense oracles ----------------------------------------------------------------------------
    def dense_J(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense J̃, shape ``(d, p)``."""
        return self.model.as_matrix(dtype) * self.scale.to(dtype)

    def dense_AJ(self, dtype: torch.dtype = torch.float64, J_tilde: torch.Tensor | None = None) -> torch.Tensor:
        """Dense A J̃, shape ``(m, p)`` (pass ``J_tilde`` = :meth:`dense_J` to reuse it)."""
        if J_tilde is None:
            J_tilde = self.dense_J(torch.float64)
        if self.m * self.d <= 5e7:
            return (self.A.as_matrix(torch.float64) @ J_tilde.double()).to(dtype)
        cols = self.A(J_tilde.to(self.A.dtype).T.reshape(self.p, *self.model.image_shape))
        return cols.reshape(self.p, self.m).T.to(dtype)

    # -- serialisation ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the network and operator (which are rebuilt from their own stages)."""
        return {
            "format": _FORMAT,
            "g": self.g,
            "sigma2": self.sigma2,
            "scale": self.scale.cpu(),
            "y": self.y.cpu(),
            "prior_center": self.prior_center,
            "param_names": list(self.model.param_names),
            "theta_map": self.model.theta_map.cpu(),
            "image_shape": list(self.model.image_shape),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` to ``path`` atomically (temp file + rename)."""
        return save_torch(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: LinearisedModel, A) -> Posterior:
        """Rebuild a saved posterior around ``model`` and ``A`` (checked against the saved θ*)."""
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a data error
            raise DipuqError(f"cannot read posterior file {path}: {exc}") from exc
        if not isinstance(st, dict) or st.get("format") != _FORMAT:
            raise DipuqError(f"{path} is not a dipuq posterior file")
        if st["param_names"] != list(model.param_names) or st["theta_map"].numel() != model.p:
            raise DipuqError(f"{path}: saved posterior belongs to a different network (weights differ)")
        if not torch.allclose(st["theta_map"], model.theta_map.cpu(), rtol=1e-5, atol=1e-7):
            raise DipuqError(f"{path}: saved posterior was linearised at different weights theta_map")
        return cls(model, A, st["y"], sigma2=st["sigma2"], g=st["g"], scale=st["scale"],
                   prior_center=st["prior_center"])

    def __repr__(self) -> str:
        return (f"Posterior(p={self.p}, d={self.d}, m={self.m}, g={self.g:.4g}, "
                f"sigma2={self.sigma2:.4g}, prior_center={self.prior_center!r})")


class Jacobian(LinearOperator):
    """J = ∂f/∂θ at θ* as an operator: weights ``(n, p)`` -> images ``(n, *image_shape)`` by
    ``model.jvp``, and back by ``model.vjp``."""

    def __init__(self, model: LinearisedModel):
        self.model = model
        self.domain_shape, self.range_shape = (model.p,), tuple(model.image_shape)
        self.dtype, self.device = model.dtype, model.device

    def _apply(self, v):
        return self.model.jvp(v)

    def _adjoint(self, u):
        return self.model.vjp(u)
