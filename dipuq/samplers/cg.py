"""``cg``: Matheron's rule with the dual system solved by Nyström-preconditioned conjugate gradients.

Chain k's sample is z_k = w₀ + g J̃ᵀAᵀ α with (K + σ²I) α = ε − AJ̃w₀, K = g AJ̃J̃ᵀAᵀ
(:mod:`dipuq.samplers`), solved for a batch of chains by CG with a randomised Nyström
preconditioner of K (Frangella, Tropp & Udell 2023) whose rank grows as for ``sgd``
(:func:`~dipuq.samplers.nystrom.grown_nystrom`). The warm start is α.

``cg_block = true`` solves a batch's chains in one Krylov space instead (block CG, O'Leary 1980,
in the breakdown-free form of Ji & Li 2017: the search block is re-orthonormalised every step
and directions that have become dependent are dropped). All chains share one operator, so each
chain's solve sees the others' search directions; the cost per iteration is the same (one K
product per chain) plus a few (b × m) dense products.
"""

from __future__ import annotations

import torch

from dipuq.errors import DivergenceError
from dipuq.posterior.model import Posterior
from dipuq.samplers.base import Sampler, SamplerState
from dipuq.samplers.nystrom import PRECOND_KEYS, grown_nystrom, lowrank_inverse, pcg_kappa

__all__ = ["CGSampler"]


class CGSampler(Sampler):
    """Matheron's rule with the dual system (K + σ²I) α = ε − AJ̃w₀ solved by Nyström-PCG."""

    name = "cg"
    keys = Sampler.keys + ("cg_tol", "cg_max_iter", "cg_block") + PRECOND_KEYS

    def nystrom(self, post: Posterior) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Randomised Nyström approximation K₁ ≈ U diag(Λ) Uᵀ of K₁ = AJ̃J̃ᵀAᵀ (g = 1), cached.

        U (m, r), Λ (r,) in float64; K = g K₁, so one sketch serves every g (EM); the rank is
        chosen adaptively (:func:`~dipuq.samplers.nystrom.grown_nystrom`).
        """
        shape, K1 = post.A.range_shape, post.AJ @ post.AJ.T

        def matvec(V):  # (k, m) -> (k, m)
            return K1(V.to(post.model.dtype).reshape(-1, *shape)).reshape(V.shape[0], -1)

        return grown_nystrom(self.cfg, post, "nystrom_dual_sketch", post.m, matvec)

    def condition_number(self, post: Posterior, n_iter: int = 60) -> float:
        """κ of the preconditioned dual system, measured by Lanczos from ``n_iter`` PCG steps
        (:func:`~dipuq.samplers.nystrom.pcg_kappa`): the diagnostic behind the Krylov floor."""
        dt = post.model.dtype
        return pcg_kappa(lambda v: post.kernel(v.to(dt)).double(), self._precond(post), post.A.range_shape,
                         n_iter=n_iter, device=post.model.device)

    def describe(self, post: Posterior) -> dict:
        ny = self.nystrom(post)
        out = {"precond_rank": 0 if ny is None else int(ny[1].numel())}
        if ny is not None:
            out["kappa_tail"] = 1.0 + post.g * float(ny[1][-1]) / post.sigma2
        return out

    def prepare(self, post: Posterior) -> None:
        self.nystrom(post)

    def _precond(self, post: Posterior):
        ny = self.nystrom(post)
        if ny is None:
            return lambda v: v
        U, lam = ny
        lam_g = post.g * lam
        s2 = post.sigma2
        # P⁻¹ = (I − UUᵀ) + U diag((λ_r + σ²)/(λ + σ²)) Uᵀ
        return lowrank_inverse(U, (lam_g[-1] + s2) / (lam_g + s2), 1.0)

    def solve(self, post, w0, eps, chains, init=None):
        if self.cfg.cg_block and w0.shape[0] > 1:
            return (yield from self._solve_block(post, w0, eps, chains, init))
        return (yield from self._solve_single(post, w0, eps, chains, init))

    def _solve_single(self, post, w0, eps, chains, init=None):
        # The CG vectors live in float64 (they are measurement-sized, cheap): in float32 the
        # recurrences lose orthogonality on ill-conditioned K + σ²I (large g early in EM) and
        # rᵀz underflows, which made β overflow to inf. Only the K products run in the model dtype.
        cfg = self.cfg
        bsz = w0.shape[0]
        rhs = (eps - post.AJ(w0)).double()  # shape: (b, *range_shape)
        Pinv = self._precond(post)
        dt, kernel = post.model.dtype, post.kernel  # K + σ²I

        def K(v):
            return kernel(v.to(dt)).double()

        def dot(a, b):
            return (a.reshape(bsz, -1) * b.reshape(bsz, -1)).sum(1)

        bnorm = dot(rhs, rhs).sqrt().clamp(min=1e-30)
        if init is None:
            alpha = torch.zeros_like(rhs)
            res = rhs.clone()
        else:
            alpha = init.to(rhs).reshape(rhs.shape).clone()
            res = rhs - K(alpha)
        zr = Pinv(res)
        pdir = zr.clone()
        rz = dot(res, zr)
        shape = (bsz,) + (1,) * (rhs.ndim - 1)
        for it in range(cfg.cg_max_iter):
            rel = dot(res, res).sqrt() / bnorm
            if not torch.isfinite(rel).all():
                raise DivergenceError(f"cg sampler produced NaN/inf at iteration {it}: check J, A and sigma2")
            active = (rel > cfg.cg_tol) & (rz > 0)  # rᵀP⁻¹r = 0: the chain is solved to round-off
            yield SamplerState(self.name, chains, it, alpha.to(dt), None, rel)
            if not bool(active.any()):
                break
            Kp = K(pdir)
            pKp = dot(pdir, Kp)
            a = torch.where(active & (pKp > 0), rz / pKp.clamp(min=1e-30), torch.zeros_like(rz))
            alpha = alpha + a.reshape(shape) * pdir
            res = res - a.reshape(shape) * Kp
            zr = Pinv(res)
            rz_new = dot(res, zr)
            beta = torch.where(active & (rz > 0), rz_new / rz.clamp(min=1e-300), torch.zeros_like(rz))
            pdir = zr + beta.reshape(shape) * pdir
            rz = rz_new
        alpha = alpha.to(dt)
        z = w0 + post.g * post.AJ.T(alpha)
        return z, alpha.reshape(bsz, -1)

    def _solve_block(self, post, w0, eps, chains, init=None):
        """Block PCG on (K + σ²I) Α = R for the b chains at once (float64 like :meth:`_solve_single`).

        Rows are chains: X, R ``(b, m)``; the search block P ``(s, m)``, s ≤ b, is K-orthonormal
        (P K Pᵀ = I, :func:`_k_orthonormal`), so the Galerkin step is X += (R Pᵀ) P.
        """
        cfg = self.cfg
        bsz = w0.shape[0]
        shape = post.A.range_shape
        rhs = (eps - post.AJ(w0)).double().reshape(bsz, -1)
        Pinv = self._precond(post)
        dt, kernel = post.model.dtype, post.kernel

        def K(V):  # (s, m) -> (s, m)
            return kernel(V.to(dt).reshape(-1, *shape)).double().reshape(V.shape[0], -1)

        def M(V):
            return Pinv(V.reshape(-1, *shape)).reshape(V.shape[0], -1)

        bnorm = rhs.norm(dim=1).clamp(min=1e-30)
        X = torch.zeros_like(rhs) if init is None else init.to(rhs).reshape(rhs.shape).clone()
        R = rhs.clone() if init is None else rhs - K(X)
        P, KP = _k_orthonormal(M(R), K)
        for it in range(cfg.cg_max_iter):
            rel = R.norm(dim=1) / bnorm
            if not torch.isfinite(rel).all():
                raise DivergenceError(f"cg sampler (block) produced NaN/inf at iteration {it}: check J, A and sigma2")
            yield SamplerState(self.name, chains, it, X.to(dt), None, rel)
            if not bool((rel > cfg.cg_tol).any()) or P.shape[0] == 0:
                break
            a = R @ P.T  # shape: (b, s)
            X = X + a @ P
            R = R - a @ KP
            Z = M(R)
            W = Z - (Z @ KP.T) @ P  # K-orthogonal to the old block (β = −(P K Pᵀ)⁻¹ P K Z)
            P, KP = _k_orthonormal(W, K)
        X = X.to(dt)
        z = w0 + post.g * post.AJ.T(X.reshape(bsz, *shape))
        return z, X.reshape(bsz, -1)


def _k_orthonormal(W: torch.Tensor, K, drop: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows P spanning the rows of W with P K Pᵀ = I, and K P; rows whose K-energy is below
    ``drop`` × the largest are dropped (the block has become rank deficient: a chain is solved or
    its direction is already in the space). One K product per row of W."""
    KW = K(W)
    G = W @ KW.T
    G = 0.5 * (G + G.T)
    lam, V = torch.linalg.eigh(G)
    keep = lam > drop * lam.max().clamp(min=1e-300)
    T = V[:, keep] / lam[keep].sqrt()  # shape: (b, s)
    return T.T @ W, T.T @ KW
