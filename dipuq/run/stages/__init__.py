"""The pipeline's stages, in order: scan → fbp → dip → linearise → posterior → sampler →
calibrate → refit → maps → metrics → figures → report.

Each is one :class:`~dipuq.run.context.Stage` record; this tuple is the only list of them.
Folders (``stages/NN_name``), loaders of finished outputs, resume-by-dependency and the
distributed split all derive from it.
"""

from __future__ import annotations

from dipuq.run.context import Stage
from dipuq.run.stages.data import FBP, SCAN, check_memory, prepare_scan
from dipuq.run.stages.fit import DIP, LINEARISE, REFIT
from dipuq.run.stages.maps import CALIBRATE, MAPS, METRICS
from dipuq.run.stages.posterior import POSTERIOR, SAMPLER
from dipuq.run.stages.show import FIGURES, REPORT

__all__ = ["STAGES", "STAGE_NAMES", "stage", "loaders", "prepare_scan", "check_memory"]

STAGES: tuple[Stage, ...] = (SCAN, FBP, DIP, LINEARISE, POSTERIOR, SAMPLER, CALIBRATE, REFIT, MAPS, METRICS, FIGURES, REPORT)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The record of stage ``name``."""
    return STAGES[STAGE_NAMES.index(name)]


def loaders() -> dict:
    """``ctx`` key -> loader, over every stage's outputs."""
    return {key: fn for s in STAGES for key, fn in s.outputs.items()}
