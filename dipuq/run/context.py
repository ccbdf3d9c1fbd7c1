"""What the stages of a run share: the :class:`Stage` record, the :class:`RunContext` and the
:class:`RunResult` that :func:`dipuq.run.pipeline.run_pipeline` returns.

A stage is one record — name, title, the config sections its result depends on, its run
function, the outputs it can load back from its checkpoint files, the files it deletes once done,
and whether every rank of a distributed run executes it — so that adding a stage is adding one
record to :data:`dipuq.run.stages.STAGES`, never editing parallel tables.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dipuq import seeds
from dipuq.data.scan import Scan
from dipuq.errors import ConfigError, GPUUnavailableError
from dipuq.run.config import Config
from dipuq.run.rundir import RunDir

__all__ = ["Stage", "RunContext", "RunResult", "resolve_device"]


@dataclass
class Stage:
    """One step of the pipeline.

    ``run(ctx, section)`` receives the config section ``section`` whole, reads earlier stages'
    outputs as ``ctx[name]``, writes its files under ``ctx.path(self.name, ...)`` and returns a
    small JSON summary (kept in its ``done.json``). ``reads`` names every config section its
    result depends on (``section`` first): a change in any of them reruns this stage and all
    after it, and nothing before. ``outputs`` maps each ``ctx`` key the stage produces to a
    function that loads (or rebuilds) it from the stage's files when a resumed run needs it.
    """

    name: str
    title: str
    run: Callable[[RunContext, Any], dict]
    section: str
    reads: tuple[str, ...] = ()
    outputs: Mapping[str, Callable[[RunContext], Any]] = field(default_factory=dict)
    cleanup: tuple[str, ...] = ()  # resume-within-stage files, obsolete once the stage is done
    all_ranks: bool = False  # under torchrun every rank runs it (the others: rank 0 alone)

    @property
    def sections(self) -> tuple[str, ...]:
        """Every config section this stage's result depends on."""
        return (self.section, *(s for s in self.reads if s != self.section))


def resolve_device(device: str | None) -> torch.device:
    """``"cpu"``, ``"cuda"`` (checked) or ``"auto"``/None (cuda when usable, else cpu)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise GPUUnavailableError(f"--device {device} requested but torch sees no CUDA device; use --device cpu")
        return torch.device(device)
    raise ConfigError(f"unknown device {device!r}: use cpu, cuda or auto")


@dataclass
class RunContext:
    """What the stages share: the run folder, request, device, and stage outputs (lazy).

    ``ctx[name]`` returns an output (``"scan"``, ``"A"``, ``"y"``, ``"fbp"``, ``"dip"``, ``"net"``,
    ``"model"``, ``"scale"``, ``"posterior"``, ``"em"``, ``"moments"``, ``"sampling"``, ``"maps"``,
    ``"metrics"``, ...), computing or loading it on first use with the loader of the stage that
    produces it (``loaders``, built from the stage records).
    """

    run: RunDir
    config: Config
    seed: int
    device: torch.device
    progress: bool = True
    input_scan: Scan | None = None
    values: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print
    dist: Any = None  # dipuq.samplers.ranks.DistContext: rank 0 writes, all ranks sample
    loaders: Mapping[str, Callable[[RunContext], Any]] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def __getitem__(self, name: str):
        if name not in self.values:
            self.values[name] = self.loaders[name](self)
        return self.values[name]

    def __setitem__(self, name: str, value) -> None:
        self.values[name] = value

    def gen(self, stage: str) -> torch.Generator:
        """The generator of ``stage``: a pure function of (run seed, the stage's position)."""
        return seeds.generator(self.seed, self.run.stages.index(stage))

    def path(self, stage: str, name: str) -> Path:
        return self.run.stage_path(stage, name)

    def tqdm(self, **kw):
        return tqdm(disable=not self.progress, dynamic_ncols=True, leave=False, file=sys.stderr, **kw)


@dataclass
class RunResult:
    """What :func:`~dipuq.run.pipeline.run_pipeline` returns: the volumes, metrics and where everything is."""

    run_dir: Path
    recon: np.ndarray
    std: np.ndarray
    metrics: dict | None
    timings: dict[str, float]
    resumed_from: str | None
