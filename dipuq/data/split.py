"""The held-out split of a scan's projection angles: rows the DIP fit never sees.

A :class:`ProjectionSplit` partitions the angle indices ``0 … n−1`` of a scan into a *fit* set
(what the DIP and the posterior see) and a *held-out* set H (what the stop rule, the FBP-vs-DIP
check and the error-bar calibration are judged on). Restricting ``A`` to H is restricting its
geometry to those angles: ``A_H = RayTransform(scan.geometry.subset(split.held))``, so
``y_H = A_H x + η_H`` with the same noise model as the fitted rows.

Choice (:meth:`ProjectionSplit.choose`): the angles are sorted by value and cut into ``n_H``
consecutive blocks of (nearly) equal size; one angle is drawn uniformly in each block from the
generator. The held-out angles are therefore interleaved over the whole angular range (no gap
that a limited-angle scan would notice), and the choice is a pure function of the seed. Frames
repeated at the same angle (tilt series often repeat tilts) are one *group*: a group is held
out or fitted whole, so no copy of a held-out projection reaches the fit.

Example::

    >>> import torch
    >>> s = ProjectionSplit.choose(np.linspace(0, np.pi, 30, endpoint=False), 0.1,
    ...                            generator=torch.Generator().manual_seed(0))
    >>> len(s.held), len(s.fit)
    (3, 27)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dipuq._io import atomic_path
from dipuq.data.scan import Scan
from dipuq.errors import ConfigError, DipuqError

__all__ = ["ProjectionSplit", "angle_groups"]

#: Angles closer than this (radians, ~0.006°) are the same angle (repeated frames).
SAME_ANGLE_RAD = 1e-4


def angle_groups(angles) -> list[np.ndarray]:
    """Indices of the frames at each distinct angle, groups ordered by angle."""
    a = np.asarray(angles, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    groups, cur = [], [order[0]] if len(order) else []
    for i in order[1:]:
        if a[i] - a[cur[-1]] <= SAME_ANGLE_RAD:
            cur.append(i)
        else:
            groups.append(np.asarray(cur))
            cur = [i]
    if cur:
        groups.append(np.asarray(cur))
    return groups


@dataclass(frozen=True)
class ProjectionSplit:
    """A partition of ``n_angles`` projection indices into ``fit`` and ``held`` (both sorted).

    Attributes
    ----------
    n_angles : number of projection angles of the scan that was split
    fit : indices of the angles the fit sees, ``(n_fit,)``
    held : indices of the held-out angles, ``(n_held,)`` (empty: no split)
    fraction : the requested held-out fraction (for the record)
    """

    n_angles: int
    fit: tuple[int, ...]
    held: tuple[int, ...]
    fraction: float = 0.0

    def __post_init__(self):
        both = sorted(self.fit + self.held)
        if both != list(range(self.n_angles)):
            raise DipuqError(f"a projection split must partition 0..{self.n_angles - 1}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def none(cls, n_angles: int) -> ProjectionSplit:
        """No held-out angles: everything is fitted."""
        return cls(int(n_angles), tuple(range(int(n_angles))), (), 0.0)

    @classmethod
    def choose(cls, angles, fraction: float, min_count: int = 3, generator: torch.Generator | None = None
               ) -> ProjectionSplit:
        """Hold out about ``fraction`` of the angles (at least ``min_count``), interleaved.

        ``fraction = 0`` gives :meth:`none`. Raises :class:`ConfigError` when fewer than two
        distinct fit angles would remain.
        """
        angles = np.asarray(angles, dtype=np.float64)
        n = len(angles)
        if not 0 <= fraction < 1:
            raise ConfigError(f"data.holdout must be in [0, 1), got {fraction!r}")
        if fraction == 0:
            return cls.none(n)
        groups = angle_groups(angles)
        n_h = max(int(min_count), int(round(fraction * len(groups))))
        if len(groups) - n_h < 2:
            raise ConfigError(f"holding out {n_h} of {len(groups)} distinct angles leaves fewer than 2 to fit; "
                              "lower data.holdout / data.holdout_min or set data.holdout = 0")
        edges = np.linspace(0, len(groups), n_h + 1)
        picks = []
        for b in range(n_h):
            lo, hi = int(math.floor(edges[b])), max(int(math.floor(edges[b + 1])), int(math.floor(edges[b])) + 1)
            picks.append(lo + int(torch.randint(0, hi - lo, (1,), generator=generator)))
        held = sorted(int(i) for p in picks for i in groups[p])
        fit = sorted(set(range(n)) - set(held))
        return cls(n, tuple(fit), tuple(held), float(fraction))

    # -- use ------------------------------------------------------------------------------
    @property
    def has_heldout(self) -> bool:
        return len(self.held) > 0

    def restrict(self, scan: Scan, part: str) -> Scan:
        """The scan restricted to the ``"fit"`` or ``"held"`` angles (projections, raw data, geometry)."""
        if scan.geometry.n_angles != self.n_angles:
            raise DipuqError(f"this split is for {self.n_angles} angles, the scan has {scan.geometry.n_angles}")
        idx = np.asarray(getattr(self, part), dtype=np.int64)
        if idx.size == 0:
            raise DipuqError(f"the split has no {part!r} angles")
        raw = dict(counts=scan.counts[idx]) if scan.has_raw else {}
        meta = {**scan.meta, f"{part}_angle_indices": idx.tolist()}
        return scan.replace(projections=scan.projections[idx], geometry=scan.geometry.subset(idx), meta=meta, **raw)

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"n_angles": self.n_angles, "fit": list(self.fit), "held": list(self.held), "fraction": self.fraction}

    @classmethod
    def from_dict(cls, d: dict) -> ProjectionSplit:
        return cls(int(d["n_angles"]), tuple(int(i) for i in d["fit"]), tuple(int(i) for i in d["held"]),
                   float(d.get("fraction", 0.0)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON (atomic)."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict()))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProjectionSplit:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DipuqError(f"cannot read projection split {path} ({type(exc).__name__})") from None
