"""g-prior scales of the linearised DIP's weights: s_j = (D_j / m)^(-1/2), D = diag(JᵀAᵀAJ).

With θ − θ* = s ⊙ w, every column of AJ̃ (J̃ = J diag(s)) has squared norm m, the number of
measurements: the prior w ~ N(0, g I) is invariant to the units of each weight, and
``diag(σ⁻² J̃ᵀAᵀAJ̃) = m / σ²`` is constant (a Jacobi-preconditioned Hessian). D is estimated by
Monte Carlo, D_j = E_v[(JᵀAᵀv)_j²] with v ~ N(0, I_m), or computed exactly for tiny problems.
Entries with D_j below ``floor · mean(D)`` (weights the data cannot see, e.g. dead channels) are
raised to that floor, so scales stay finite.

Shapes: D and s are flat ``(p,)`` vectors in the order of ``model.param_names``.

Example::

    >>> s = gprior_scale(model, A, n_probes=64, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> s.shape                                                                               # doctest: +SKIP
    torch.Size([p])
"""

from __future__ import annotations

import torch

from dipuq.errors import DipuqError
from dipuq.posterior.linearise import LinearisedModel

__all__ = ["gprior_diagonal", "gprior_scale"]


def gprior_diagonal(
    model: LinearisedModel,
    A,
    n_probes: int | None = 128,
    generator: torch.Generator | None = None,
    batch: int = 16,
) -> torch.Tensor:
    """diag(JᵀAᵀAJ), shape ``(p,)``: exact if ``n_probes is None``, else a Monte Carlo estimate.

    The estimate is mean_k (JᵀAᵀv_k)² with v_k ~ N(0, I_m), unbiased with relative standard
    deviation sqrt(2 / n_probes) per entry.
    """
    m = A.shape[0]
    if n_probes is None:
        if m * model.p > 5e7:
            raise DipuqError(f"exact g-prior diagonal needs an ({m} x {model.p}) matrix: use n_probes")
        JT_AT = []
        eye = torch.eye(m, dtype=model.dtype, device=model.device)
        for i in range(0, m, 256):
            rows = eye[i : i + 256].reshape(-1, *A.range_shape)
            JT_AT.append(model.vjp(A.adjoint(rows)).double().pow(2).sum(0))
        return torch.stack(JT_AT).sum(0)
    if n_probes < 1:
        raise DipuqError(f"n_probes must be >= 1, got {n_probes}")
    acc = torch.zeros(model.p, dtype=torch.float64, device=model.device)
    done = 0
    while done < n_probes:
        b = min(batch, n_probes - done)
        v = torch.randn(b, *A.range_shape, generator=generator, dtype=model.dtype, device=model.device)
        acc += model.vjp(A.adjoint(v)).double().pow(2).sum(0)
        done += b
    return acc / n_probes


def gprior_scale(
    model: LinearisedModel,
    A,
    n_probes: int | None = 128,
    generator: torch.Generator | None = None,
    floor: float = 1e-4,
) -> torch.Tensor:
    """g-prior scales s_j = (max(D_j, floor·mean D) / m)^(-1/2), shape ``(p,)``, dtype of the model.

    ``n_probes=None`` computes D = diag(JᵀAᵀAJ) exactly (m VJPs; tiny problems only).
    """
    D = gprior_diagonal(model, A, n_probes=n_probes, generator=generator)
    if not torch.isfinite(D).all():
        raise DipuqError("g-prior diagonal has NaN/inf entries: the network Jacobian is not finite")
    mean_D = D.mean()
    if mean_D <= 0:
        raise DipuqError("g-prior diagonal is zero: the measured data do not depend on any conv weight")
    m = A.shape[0]
    return (D.clamp(min=floor * mean_D) / m).rsqrt().to(model.dtype)
