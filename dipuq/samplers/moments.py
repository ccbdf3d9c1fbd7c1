"""Streaming per-voxel moments of posterior image samples.

:class:`Moments` keeps float64 power sums S_q = Σ_k x_k^q (q = 1, 2, 4) of image samples x_k, one
batch at a time, so a 3D run never holds more than one batch of samples. For *zero-mean* samples
(the sampler's x_k = J̃ z_k, z_k ~ N(0, H⁻¹)) the variance estimate is

    v_i = S_2,i / K,     std_i = sqrt(v_i),

and its Monte Carlo standard error, by the delta method, is

    se(std_i) = sqrt((S_4,i / K − v_i²) / K) / (2 std_i)      (= std_i / sqrt(2K) for Gaussians).

With ``zero_mean=False`` the usual unbiased sample variance around the sample mean is used
(MC dropout and other baselines). Two accumulators merge exactly (sums add), which is what an
all-reduce across ranks does.

Example::

    >>> import torch
    >>> mom = Moments((4, 4))
    >>> for _ in range(10):
    ...     _ = mom.update(torch.randn(8, 4, 4))
    >>> mom.n, tuple(mom.std().shape)
    (80, (4, 4))
"""

from __future__ import annotations

import torch

from dipuq.errors import DipuqError

__all__ = ["Moments"]


class Moments:
    """Streaming per-voxel power sums of image samples (float64).

    Parameters
    ----------
    shape : tuple of int
        Image shape (y, x) or (z, y, x).
    zero_mean : bool
        Samples are known to have mean zero (variance = mean of squares) or not.
    fourth : bool
        Also accumulate Σ x⁴ for a distribution-free standard error of the std of zero-mean
        samples (one more volume of memory); otherwise the Gaussian formula std / sqrt(2K).
    """

    def __init__(self, shape, zero_mean: bool = True, fourth: bool = True, device=None):
        self.shape = tuple(shape)
        self.zero_mean, self.fourth = zero_mean, fourth
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.s1 = torch.zeros(self.shape, **kw)
        self.s2 = torch.zeros(self.shape, **kw)
        self.s4 = torch.zeros(self.shape, **kw) if fourth else None

    def update(self, samples: torch.Tensor) -> Moments:
        """Add a batch of samples, shape ``(b, *shape)`` (or one sample of shape ``shape``)."""
        x = samples.detach()
        if tuple(x.shape) == self.shape:
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != self.shape:
            raise DipuqError(f"samples of shape {tuple(x.shape[1:])} do not match moments shape {self.shape}")
        x = x.to(device=self.s1.device, dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise DipuqError("non-finite posterior samples (NaN/inf): the sampler diverged")
        self.n += x.shape[0]
        self.s1 += x.sum(0)
        x2 = x * x
        self.s2 += x2.sum(0)
        if self.fourth:
            self.s4 += (x2 * x2).sum(0)
        return self

    def merge(self, other: Moments) -> Moments:
        """Add another accumulator's sums into this one (exact; order-independent up to rounding)."""
        if other.shape != self.shape or other.zero_mean != self.zero_mean or other.fourth != self.fourth:
            raise DipuqError("cannot merge moments of different shape or kind")
        self.n += other.n
        self.s1 += other.s1.to(self.s1.device)
        self.s2 += other.s2.to(self.s2.device)
        if self.fourth:
            self.s4 += other.s4.to(self.s4.device)
        return self

    def _need(self, k: int):
        if self.n < k:
            raise DipuqError(f"need at least {k} samples, have {self.n}")

    def mean(self) -> torch.Tensor:
        """Sample mean Σx / K (≈ 0 for zero-mean samples; a diagnostic)."""
        self._need(1)
        return self.s1 / self.n

    def variance(self) -> torch.Tensor:
        """Per-voxel variance: S2/K for zero-mean samples, else the unbiased sample variance."""
        if self.zero_mean:
            self._need(1)
            return self.s2 / self.n
        self._need(2)
        mu = self.s1 / self.n
        return ((self.s2 - self.n * mu * mu) / (self.n - 1)).clamp(min=0)

    def std(self) -> torch.Tensor:
        return self.variance().sqrt()

    def std_se(self) -> torch.Tensor:
        """Monte Carlo standard error of :meth:`std` (delta method; 0 where std is 0)."""
        v = self.variance()
        if self.fourth and self.zero_mean:
            var_v = (self.s4 / self.n - v * v).clamp(min=0) / self.n
        else:  # Gaussian formula Var(v̂) = 2v² / dof
            dof = self.n if self.zero_mean else self.n - 1
            var_v = 2 * v * v / max(dof, 1)
        std = v.sqrt()
        return torch.where(std > 0, var_v.sqrt() / (2 * std.clamp(min=1e-300)), torch.zeros_like(std))

    def state_dict(self) -> dict:
        return {"shape": list(self.shape), "zero_mean": self.zero_mean, "fourth": self.fourth, "n": self.n,
                "s1": self.s1.cpu(), "s2": self.s2.cpu(), "s4": None if self.s4 is None else self.s4.cpu()}

    @classmethod
    def from_state_dict(cls, st: dict) -> Moments:
        mom = cls(st["shape"], zero_mean=st["zero_mean"], fourth=st["fourth"])
        mom.n, mom.s1, mom.s2, mom.s4 = int(st["n"]), st["s1"], st["s2"], st["s4"]
        return mom

    def __repr__(self) -> str:
        return f"Moments(shape={self.shape}, n={self.n}, zero_mean={self.zero_mean})"
