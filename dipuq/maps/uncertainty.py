"""Per-voxel uncertainty maps from the streamed moments of posterior samples.

:class:`UncertaintyMaps` bundles the predictive mean, std and its Monte Carlo standard error
(from a :class:`~dipuq.samplers.moments.Moments` accumulator), and gives z-scores and central
intervals; it saves to / loads from one NPZ file.

Example::

    >>> import torch
    >>> from dipuq.samplers.moments import Moments
    >>> mom = Moments((4, 4)).update(torch.randn(80, 4, 4))
    >>> maps = UncertaintyMaps.from_moments(torch.zeros(4, 4), mom)
    >>> maps.std.shape, maps.n_samples
    ((4, 4), 80)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dipuq._io import atomic_path
from dipuq.errors import DipuqError
from dipuq.samplers.moments import Moments

__all__ = ["UncertaintyMaps", "normal_quantile"]


def normal_quantile(q: float) -> float:
    """Φ⁻¹(q), the standard normal quantile."""
    return math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(2.0 * q - 1.0, dtype=torch.float64)))


@dataclass
class UncertaintyMaps:
    """Predictive mean μ, std σ and the MC standard error of σ, per voxel (numpy float32/64).

    ``zscore(ref)`` = (ref − μ)/σ; ``interval(level)`` = μ ∓ Φ⁻¹((1+level)/2) σ.
    """

    mean: np.ndarray
    std: np.ndarray
    std_se: np.ndarray | None = None
    n_samples: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.mean = np.asarray(self.mean)
        self.std = np.asarray(self.std)
        if self.mean.shape != self.std.shape:
            raise DipuqError(f"mean {self.mean.shape} and std {self.std.shape} shapes differ")
        if self.std_se is not None:
            self.std_se = np.asarray(self.std_se)

    @classmethod
    def from_moments(cls, mean, moments: Moments, meta: dict | None = None) -> UncertaintyMaps:
        """Maps from a predictive mean (e.g. the DIP reconstruction) and sample moments."""
        mean = mean.detach().cpu().numpy() if isinstance(mean, torch.Tensor) else np.asarray(mean)
        return cls(mean=mean.reshape(moments.shape), std=moments.std().cpu().numpy(),
                   std_se=moments.std_se().cpu().numpy(), n_samples=moments.n, meta=dict(meta or {}))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def zscore(self, reference, eps: float = 1e-12) -> np.ndarray:
        """(reference − mean) / std (std floored at ``eps``)."""
        ref = np.asarray(reference, dtype=np.float64).reshape(self.shape)
        return (ref - self.mean) / np.maximum(self.std, eps)

    def interval(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Central Gaussian interval holding probability ``level`` (0 < level < 1)."""
        if not 0 < level < 1:
            raise DipuqError(f"interval level must be in (0, 1), got {level}")
        h = normal_quantile(0.5 + level / 2) * self.std
        return self.mean - h, self.mean + h

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic NPZ write (mean, std, std_se, n_samples, meta as JSON)."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "std": self.std, "n_samples": np.array(self.n_samples),
                  "meta": np.array(json.dumps(self.meta))}
        if self.std_se is not None:
            arrays["std_se"] = self.std_se
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> UncertaintyMaps:
        import json

        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(mean=f["mean"], std=f["std"], std_se=f["std_se"] if "std_se" in f else None,
                           n_samples=int(f["n_samples"]), meta=json.loads(str(f["meta"])))
        except (OSError, KeyError, ValueError) as exc:
            raise DipuqError(f"cannot read uncertainty maps from {path}: {exc}") from exc
