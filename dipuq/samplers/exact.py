"""``exact``: dense Cholesky of (K + σ²I) (m ≤ p) or of H (p < m), in float64.

The oracle every sampler is tested against, for tiny problems only: it forms J̃ ``(d, p)`` and
AJ̃ ``(m, p)`` densely (``Posterior.dense_J`` / ``dense_AJ``), and also gives the exact image
variance diag(J̃H⁻¹J̃ᵀ) and the log evidence log N(r; 0, gAJ̃J̃ᵀAᵀ + σ²I).
"""

from __future__ import annotations

import math

import torch

from dipuq import memory
from dipuq.errors import DipuqError
from dipuq.posterior.model import Posterior
from dipuq.samplers.base import Sampler, SamplerState

__all__ = ["ExactSampler"]


class ExactSampler(Sampler):
    """Dense Cholesky oracle (float64). Refuses problems with more than ``max_dense`` matrix entries."""

    name = "exact"
    keys = Sampler.keys + ("max_dense",)

    def dense(self, post: Posterior) -> tuple[torch.Tensor, torch.Tensor]:
        """(J̃ (d, p), A J̃ (m, p)) in float64, cached on ``post``."""
        if "dense" not in post.cache:
            big = max(post.m, post.d) * post.p
            if big <= self.cfg.max_dense:
                memory.require(8.0 * (post.d + post.m) * post.p + 8.0 * min(post.m, post.p) ** 2,
                               f"the exact sampler's dense ({post.d} + {post.m}) x {post.p} matrices",
                               "lower sampler.max_dense, or use sampler 'sgd' or 'cg'")
            if big > self.cfg.max_dense:
                raise DipuqError(
                    f"exact sampler needs dense ({max(post.m, post.d)} x {post.p}) matrices "
                    f"({big:.3g} entries > max_dense {self.cfg.max_dense:.3g}): use sampler 'sgd' or 'cg'"
                )
            Jt = post.dense_J(torch.float64)
            post.cache["dense"] = (Jt, post.dense_AJ(torch.float64, J_tilde=Jt))
        return post.cache["dense"]

    def prepare(self, post: Posterior) -> None:
        self.dense(post)

    def _factor(self, post: Posterior):
        _, B = self.dense(post)
        key = ("chol", post.g, post.sigma2)
        if key not in post.cache:
            for k in [k for k in post.cache if isinstance(k, tuple) and k[0] == "chol"]:
                del post.cache[k]
            if post.m <= post.p:
                S = post.g * B @ B.T + post.sigma2 * torch.eye(post.m, dtype=B.dtype, device=B.device)
            else:
                S = B.T @ B / post.sigma2 + torch.eye(post.p, dtype=B.dtype, device=B.device) / post.g
            post.cache[key] = torch.linalg.cholesky(S)
        return B, post.cache[key]

    def solve(self, post, w0, eps, chains, init=None):
        B, L = self._factor(post)
        w0d, epsd = w0.double(), eps.reshape(eps.shape[0], -1).double()
        if post.m <= post.p:
            alpha = torch.cholesky_solve((epsd - w0d @ B.T).T, L).T  # shape: (b, m)
            z = w0d + post.g * alpha @ B
        else:
            w_n = w0d + (post.g / post.sigma2) * epsd @ B
            z = torch.cholesky_solve((w_n / post.g).T, L).T
        z = z.to(w0.dtype)
        yield SamplerState(self.name, chains, 0, z)
        return z, z

    def image_variance(self, post: Posterior) -> torch.Tensor:
        """Exact diag(J̃ H⁻¹ J̃ᵀ), shape ``image_shape`` (float64)."""
        Jt, _ = self.dense(post)
        B, L = self._factor(post)
        if post.m <= post.p:  # H⁻¹ = gI − g² Bᵀ(K+σ²I)⁻¹B
            W = torch.linalg.solve_triangular(L, B @ Jt.T, upper=False)  # shape: (m, d)
            var = post.g * Jt.pow(2).sum(1) - post.g**2 * W.pow(2).sum(0)
        else:
            W = torch.linalg.solve_triangular(L, Jt.T, upper=False)  # shape: (p, d)
            var = W.pow(2).sum(0)
        return var.clamp(min=0).reshape(post.model.image_shape)

    def log_evidence(self, post: Posterior, g: float | None = None) -> float:
        """log N(r; 0, g AJ̃J̃ᵀAᵀ + σ²I) of the data residual r under prior variance g."""
        g = post.g if g is None else float(g)
        _, B = self.dense(post)
        r = post.data_residual.reshape(-1).double()
        m, s2 = post.m, post.sigma2
        if m <= post.p:
            S = g * B @ B.T + s2 * torch.eye(m, dtype=B.dtype, device=B.device)
            L = torch.linalg.cholesky(S)
            a = torch.linalg.solve_triangular(L, r[:, None], upper=False)
            logdet = 2 * torch.log(torch.diagonal(L)).sum()
            quad = a.pow(2).sum()
        else:  # determinant lemma and Woodbury in p dimensions
            Hd = B.T @ B / s2 + torch.eye(post.p, dtype=B.dtype, device=B.device) / g
            L = torch.linalg.cholesky(Hd)
            logdet = m * math.log(s2) + post.p * math.log(g) + 2 * torch.log(torch.diagonal(L)).sum()
            a = torch.linalg.solve_triangular(L, (B.T @ r)[:, None], upper=False)
            quad = r.pow(2).sum() / s2 - a.pow(2).sum() / s2**2
        return float(-0.5 * (quad + logdet + m * math.log(2 * math.pi)))
