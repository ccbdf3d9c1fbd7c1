"""Resume by dependency: what a rerun on an existing run directory may reuse.

A run directory belongs to one request (scan, seed, config; :mod:`dipuq.run.provenance`). On a
rerun with the same scan and seed but a changed config, every stage records which config
sections its result depends on (:attr:`dipuq.run.context.Stage.sections`): the first stage that
reads a changed section and all after it are recomputed, the finished stages before it are
reused. Changing ``sampler.*`` keeps the DIP fit (EM and sampling rerun); changing ``dip.*``
recomputes from the DIP on. A different scan or seed is refused without ``--force``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from dipuq.errors import ConfigError, DipuqError
from dipuq.run.config import Config, config_file_keys, diff_configs, flat_config, load_config
from dipuq.run.context import Stage
from dipuq.run.rundir import RunDir

__all__ = ["CONFIG_FILE", "REQUEST_FILE", "Reuse", "changed_sections", "first_affected", "plan_reuse"]

CONFIG_FILE = "config.toml"
REQUEST_FILE = "request.json"


@dataclass
class Reuse:
    """What a rerun keeps: ``carried`` finished stages, to be re-keyed to the new request;
    ``changes`` the config lines that differ; ``recompute_from`` the first stage they affect."""

    carried: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    recompute_from: str | None = None

    def describe(self) -> str | None:
        """One line for the log, or None when the config did not change."""
        if not self.changes:
            return None
        shown = "; ".join(self.changes[:3]) + ("; ..." if len(self.changes) > 3 else "")
        kept = f"reusing {', '.join(self.carried)}; " if self.carried else ""
        return f"dipuq: the config changed ({shown}): {kept}recomputing from '{self.recompute_from}'"


def changed_sections(changes: Sequence[str]) -> set[str]:
    """The config sections named by :func:`~dipuq.run.config.diff_configs` lines."""
    return {line.split(".", 1)[0].split(":", 1)[0] for line in changes}


def first_affected(stages: Sequence[Stage], sections: set[str]) -> str:
    """The earliest stage whose result depends on any of ``sections`` (unknown ones: the first)."""
    for st in stages:
        if set(st.sections) & sections:
            return st.name
    return stages[0].name


def _new_options(run: RunDir, config: Config) -> list[str]:
    """Options the run's config file lacks: a dipuq that did not have them made that run, so the
    stages reading them (whose default may be new behaviour) are recomputed, not trusted. Options
    set to None are never in the file (TOML has no null) and are not counted."""
    old = config_file_keys(run.path(CONFIG_FILE))
    return [f"{k}: (new option) -> {v!r}" for k, v in flat_config(config).items() if k not in old and v is not None]


def plan_reuse(run: RunDir, stages: Sequence[Stage], request: dict, config: Config) -> Reuse:
    """Decide what of ``run`` a rerun of ``request`` may keep; refuse (one line) what it may not.

    A missing request is fine for an empty folder; a different scan or seed, a config that
    cannot be read back, or a folder that is not a dipuq run raise. Otherwise the finished
    stages before the first one the config change affects are carried over.
    """
    try:
        old = json.loads(run.path("stages", REQUEST_FILE).read_text())
    except (OSError, ValueError):
        old = None
    if old is None:
        if run.finished_stages() or run.path(CONFIG_FILE).exists():
            raise DipuqError(f"{run.root} holds a dipuq run without a readable request; rerun with --force to start over")
        if run.exists():
            raise DipuqError(f"{run.root} is not empty and is not a dipuq run directory; choose another --out")
        return Reuse()
    if old == request:
        return Reuse()
    why = []
    if old.get("scan") != request["scan"]:
        why.append(f"a different scan ({old.get('scan_name') or old.get('scan')})")
    if old.get("seed") != request["seed"]:
        why.append(f"seed {old.get('seed')} (now {request['seed']})")
    try:
        changes = diff_configs(load_config(run.path(CONFIG_FILE)), config) + _new_options(run, config)
    except DipuqError:
        changes = None
    if changes is None:
        why.append("a config that cannot be read back")
    if why:
        raise ConfigError(f"run directory {run.root} was made with {', '.join(why)}; rerun with --force to start over, "
                          "or choose another --out")
    names = [s.name for s in stages]
    if not changes:  # the digest moved but no value did: everything finished stays valid
        return Reuse(carried=[s for s in run.finished_stages() if s in names])
    first = first_affected(stages, changed_sections(changes))
    carried = [s for s in run.finished_stages() if s in names and names.index(s) < names.index(first)]
    return Reuse(carried=carried, changes=changes, recompute_from=first)
