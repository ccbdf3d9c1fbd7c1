"""Typed, validated run configuration: one dataclass section per pipeline stage.

A :class:`Config` is a record of sections — ``data``, ``operator``, ``dip``, ``linearise``,
``posterior``, ``sampler``, ``output`` — each a dataclass whose fields carry a type, a default, a
valid range and a one-line help text. A stage receives its section whole
(``run_dip(..., config.dip)``), never a dict of loose keyword arguments.

Sources, later ones winning: the defaults, a TOML (``tomllib``) or YAML file, then
``--set section.key=value`` overrides (the value is parsed to the field's type). Every source is
checked: an unknown section or key, a wrong type or an out-of-range value raises
:class:`~dipuq.errors.ConfigError` with one line naming the section and key (and a "did you mean"
suggestion for misspellings). The resolved configuration is written to a run directory with
:func:`save_config` and reads back to an equal object with :func:`load_config`.

Example::

    >>> cfg = load_config(None, ["dip.iterations=200", "sampler.n_samples=16"])
    >>> cfg.dip.iterations, cfg.sampler.n_samples
    (200, 16)
    >>> load_config(None, ["dip.iteratons=5"])
    Traceback (most recent call last):
    ...
    dipuq.errors.ConfigError: unknown key 'iteratons' in section [dip] (did you mean 'iterations'?)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dipuq._io import atomic_write_text
from dipuq.dip.fit import DipConfig
from dipuq.dip.networks import NetworkConfig
from dipuq.errors import ConfigError
from dipuq.run.values import check_range, coerce, suggest
from dipuq.samplers import SamplerConfig

__all__ = [
    "Config",
    "DataConfig",
    "OperatorConfig",
    "DipConfig",
    "RefitConfig",
    "NetworkConfig",
    "LineariseConfig",
    "PosteriorConfig",
    "SamplerConfig",
    "SamplingConfig",
    "CalibrationConfig",
    "OutputConfig",
    "load_config",
    "config_file_keys",
    "flat_config",
    "save_config",
    "parse_override",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_digest",
]


def option(default: Any, help: str, *, ge=None, gt=None, le=None, lt=None) -> Any:
    """A dataclass field with a help text and an optional numeric range (``ge <= v``, ``v < lt``...)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections. Sentinels (0, "auto", []) stand for "not set" so every value has a TOML spelling.
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Scan preprocessing before reconstruction: repeated angles, stripe filter, angle subsampling, crop, binning."""

    angles: int = option(0, "keep this many evenly spaced projection angles (0 = all)", ge=0)
    crop_cols: list[int] = option([], "detector column range [start, stop] to keep (parallel beam; [] = all)")
    crop_rows: list[int] = option([], "3D: detector row range [start, stop] to keep ([] = all)")
    vol_xy: int = option(0, "in-plane volume size after cropping (0 = the field of view of the kept columns)", ge=0)
    bin: int = option(1, "bin detector and volume by this factor (1 = no binning)", ge=1)
    holdout: float = option(0.1, "fraction of the projection angles held out from the fit, interleaved and seed-chosen: the DIP's validation stop, the FBP check and the error-bar calibration are judged on them (0 = none)", ge=0.0, lt=1.0)
    holdout_min: int = option(3, "at least this many held-out angles when data.holdout > 0 (the error-bar calibration is cross-validated over them: with 2 it rests on two angles)", ge=1)
    repeated: Literal["mean", "keep"] = option("mean", "projections at the same angle (tilt series): average them into one (mean) or keep every frame (keep: the exact model for independent per-frame noise)")
    stripe: Literal["none", "mean", "sort"] = option("none", "stripe (ring-artefact) filter of the sinograms before angle subsampling: none, mean (subtract the high-pass of the column mean) or sort (Vo et al.'s sorting-based median filter)")
    stripe_size: int = option(15, "stripe filter width in detector columns (odd)", ge=3)


@dataclass
class OperatorConfig:
    """The ray transform A and the analytic starting reconstruction."""

    backend: str = option("auto", "projector backend: auto, astra-cuda, astra-cpu, cpu-cone, ... (--backend overrides)")


@dataclass
class LineariseConfig:
    """Linearisation x ≈ f(θ*) + J (θ − θ*) and the g-prior scales s_j = (diag(JᵀAᵀAJ)_j / m)^(-1/2)."""

    params: Literal["conv", "all"] = option("conv", "weights to linearise: conv weights (biases and norms stay at θ*) or all")
    batching: Literal["vmap", "loop"] = option("vmap", "push batches through J / Jᵀ with torch.func.vmap (fast) or a loop (less memory)")
    chunk_size: int = option(0, "largest batch per vmap call (0 = no limit)", ge=0)
    diag_probes: int = option(64, "Gaussian probes for the Monte-Carlo diagonal of JᵀAᵀAJ (0 = exact, tiny problems only)", ge=0)


@dataclass
class PosteriorConfig:
    """Posterior N(w̄, H⁻¹), H = σ⁻² J̃ᵀAᵀAJ̃ + g⁻¹ I, and the sample-based EM for the prior variance g."""

    noise: Literal["auto", "scan", "residual"] = option("auto", "σ² from the scan's known noise_std ('scan'), the DIP residual ||A f − y||²/m ('residual'), or scan if known else residual ('auto')")
    sigma2: float = option(0.0, "fixed noise variance σ² (> 0 overrides 'noise')", ge=0.0)
    g_init: float = option(0.0, "initial prior variance g (0 = data-driven: mean((θ*/s)²), a start for EM)", ge=0.0)
    prior_center: Literal["zero", "map"] = option("zero", "centre of the weight prior: θ = 0 (EM for g is informative) or θ*")
    em_rounds: int = option(3, "sample-based EM rounds updating g (0 = keep g_init)", ge=0)
    em_sampler: Literal["cg", "sgd", "exact", "same"] = option("cg", "solver for the EM rounds: cg (robust at any g: early rounds at a poor g are badly conditioned, where sgd does not converge and its unconverged samples push g further off), sgd, exact, or 'same' as sampler.method")
    em_samples: int = option(8, "posterior samples per EM round", ge=1)
    em_rtol: float = option(0.0, "stop EM early when |Δg|/g falls below this (0 = run all rounds)", ge=0.0)


@dataclass
class SamplingConfig(SamplerConfig):
    """Posterior sampling: which sampler, how many samples, and the sampler's options.

    The options inherited from :class:`dipuq.samplers.SamplerConfig` (``n_steps``, ``lr``,
    ``momentum``, ``chains_per_batch``, ``cg_tol``...) go to the sampler; this section is passed
    to it whole.
    """

    method: Literal["sgd", "cg", "exact"] = option("sgd", "sgd (scalable sample-then-optimise), cg (dual conjugate gradients) or exact (dense, tiny problems)")
    n_samples: int = option(32, "number of posterior samples for the std map", ge=1)


@dataclass
class CalibrationConfig:
    """Calibration of the error bars on the held-out projections (needs data.holdout > 0)."""

    enabled: bool = option(True, "fit the variance model on the held-out projections (false: the raw linearised-posterior std)")
    terms: Literal["auto", "scale", "scale+prior", "scale+boot", "scale+prior+boot"] = option("auto", "variance model: c·Σ_post ('scale'), + b·Σ_prior ('+prior', a model-error term shaped by the prior), + w·V_boot ('+boot', the equivariant bootstrap's simulated reconstruction error), or the one with the highest cross-validated held-out log-likelihood ('auto')")
    noise: Literal["fit", "posterior"] = option("fit", "σ² of the held-out rays: fitted with the other parameters ('fit') or the posterior's σ² ('posterior')")
    tails: Literal["auto", "gaussian", "student"] = option("auto", "interval shape: Gaussian, Student-t with fitted degrees of freedom, or the better of the two by cross-validated held-out log-likelihood ('auto'); with a bootstrap term the image's shape comes from the bootstrap replicates")
    bootstrap: int = option(32, "replicates of the equivariant bootstrap (TV reconstructions, x ≥ 0 unless the image is signed, of the DIP image rotated about the axis and re-projected with noise) whose error variance is a candidate term of the variance model; 0 = off", ge=0)
    bootstrap_iter: int = option(300, "PDHG iterations of each bootstrap TV reconstruction", ge=1)


@dataclass
class RefitConfig:
    """The DIP continued on all angles once the held-out ones have stopped it and calibrated the error bars."""

    steps: int = option(300, "Adam steps of the refit from θ* on every angle, held-out ones included (0 = keep the held-out-stopped fit; measured on 18 tooth/Shepp-Logan runs: +0.47 dB mean at 300 steps, 13 of 18 better, worst -0.33); the std maps stay those calibrated for the held-out fit", ge=0)
    ramp: int = option(50, "learning-rate ramp of the refit: dip.lr is reached after this many steps (Adam restarts; a 150-step ramp measured no better: +0.34 dB mean)", ge=0)


@dataclass
class OutputConfig:
    """Files written at the end of a run."""

    figures: bool = option(True, "write PNG figures to figures/")
    report: bool = option(True, "write the self-contained report.html")
    tiff: bool = option(True, "write recon.tif and std.tif (float32, ImageJ)")
    report_slices: int = option(24, "slices per axis pre-rendered in report.html", ge=1, le=128)
    zscore_limit: float = option(3.0, "colour range +-limit of the z-score maps", gt=0.0)
    dpi: int = option(110, "resolution of the PNG figures", ge=30, le=600)


@dataclass
class Config:
    """A full run configuration: one section per stage (see each section's fields)."""

    data: DataConfig = field(default_factory=DataConfig)
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    dip: DipConfig = field(default_factory=lambda: DipConfig(checkpoint_every=100))
    linearise: LineariseConfig = field(default_factory=LineariseConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    sampler: SamplingConfig = field(default_factory=SamplingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def replace(self, overrides: list[str] | tuple[str, ...] | dict[str, Any]) -> Config:
        """A copy with ``section.key=value`` overrides (strings or a ``{"section.key": value}`` dict)."""
        return apply_overrides(self, overrides)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> Config:
        return config_from_dict(d, source=source)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _sections(cfg_cls=Config) -> dict[str, type]:
    hints = typing.get_type_hints(cfg_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg_cls)}


def _is_section(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _build_section(cls: type, values: dict[str, Any], section: str, *, text: bool = False, base=None):
    """Section ``cls`` from ``values`` (on top of ``base`` or the defaults), every key checked.

    A field whose type is itself a dataclass is a sub-section (``[dip.network]`` in TOML,
    ``dip.network.channels=16`` on the command line) and is built recursively.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"section [{section}] must be a table of key = value pairs, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} in section [{section}]" + suggest(str(key), fields))
    kwargs = {}
    for name, f in fields.items():
        where = f"{section}.{name}"
        old = getattr(base, name) if base is not None else None
        if _is_section(hints[name]):
            if name in values or old is not None:
                kwargs[name] = _build_section(hints[name], values.get(name, {}), where, text=text, base=old)
        elif name in values:
            v = coerce(values[name], hints[name], where, text)
            check_range(v, f, where)
            kwargs[name] = v
        elif base is not None:
            kwargs[name] = list(old) if isinstance(old, list) else old
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    except (TypeError, ValueError) as exc:  # a section's own __post_init__ checks
        raise ConfigError(f"section [{section}]: {' '.join(str(exc).split())}") from None


def config_from_dict(d: dict[str, Any], *, source: str = "config", cfg_cls=Config) -> Config:
    """A :class:`Config` from nested ``{section: {key: value}}`` (missing keys take defaults)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(d).__name__}")
    sections = _sections(cfg_cls)
    for name in d:
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}]" + suggest(str(name), sections))
    defaults = cfg_cls()
    return cfg_cls(**{name: _build_section(cls, d.get(name) or {}, name, base=getattr(defaults, name))
                      for name, cls in sections.items()})


def config_to_dict(cfg) -> dict[str, Any]:
    """Nested plain dict ``{section: {key: value}}`` (lists for tuples), JSON/TOML/YAML ready."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], str]:
    """``"section[.sub].key=value"`` → ``(["section", ..., "key"], value_text)``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. dip.iterations=500)")
    lhs, value = text.split("=", 1)
    parts = lhs.strip().split(".")
    if len(parts) < 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. dip.iterations=500)")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return [p.strip() for p in parts], value


def apply_overrides(cfg: Config, overrides) -> Config:
    """A copy of ``cfg`` with overrides applied: strings ``"section.key=value"`` (the value is
    parsed to the key's type) or a ``{"section.key": value}`` dict of already-typed values."""
    if isinstance(overrides, dict):
        items = [(k.split("."), v, False) for k, v in overrides.items()]
    else:
        items = [(*parse_override(o), True) for o in overrides]
    sections = _sections(type(cfg))
    grouped: dict[str, dict[str, Any]] = {}
    text_flags: dict[str, bool] = {}
    for path, value, text in items:
        section = path[0]
        if section not in sections:
            raise ConfigError(f"unknown section [{section}] in override {'.'.join(path)}" + suggest(section, sections))
        node = grouped.setdefault(section, {})
        for part in path[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)} conflicts with another override")
        node[path[-1]] = value
        text_flags[section] = text_flags.get(section, False) or text
    new = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for section, values in grouped.items():
        new[section] = _build_section(sections[section], values, section, text=text_flags[section], base=new[section])
    return type(cfg)(**new)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a file: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if suffix in (".yaml", ".yml"):
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
        return d or {}
    raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml or .yml")


def load_config(path: str | Path | None = None, overrides=(), *, cfg_cls=Config) -> Config:
    """Defaults ← TOML/YAML file ``path`` (if given) ← ``overrides`` (``"section.key=value"``)."""
    d = _read_file(Path(path)) if path is not None else {}
    cfg = config_from_dict(d, source=str(path) if path else "config", cfg_cls=cfg_cls)
    return apply_overrides(cfg, list(overrides)) if overrides else cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def _toml_table(obj, name: str, lines: list[str]) -> None:
    lines += ["", f"[{name}]"]
    subs = []
    own = set(vars(type(obj)).get("__annotations__", {}))  # a subclass's own keys first
    for sf in sorted(dataclasses.fields(obj), key=lambda f: f.name not in own):
        v = getattr(obj, sf.name)
        if dataclasses.is_dataclass(v):
            subs.append((sf.name, v))
            continue
        if v is None:  # TOML has no null: leave the key out so that the default (None) applies
            lines.append(f"# {sf.name} = (none)")
            continue
        help_ = sf.metadata.get("help", "")
        lines.append(f"{sf.name} = {_toml_value(config_to_dict(v) if dataclasses.is_dataclass(v) else v)}"
                     + (f"  # {help_}" if help_ else ""))
    for sub, v in subs:
        _toml_table(v, f"{name}.{sub}", lines)


def dumps_config(cfg: Config, fmt: Literal["toml", "yaml"] = "toml") -> str:
    """The resolved config as TOML (with each key's help as a comment) or YAML text."""
    if fmt == "yaml":
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    lines = ["# dipuq resolved configuration (reuse with: dipuq reconstruct ... --config THIS_FILE)"]
    for f in dataclasses.fields(cfg):
        _toml_table(getattr(cfg, f.name), f.name, lines)
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` atomically as TOML or YAML (by suffix); :func:`load_config` reads it back."""
    path = Path(path)
    fmt = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "toml"
    atomic_write_text(path, dumps_config(cfg, fmt))
    return path


def config_digest(obj) -> str:
    """SHA-256 (16 hex chars) of a config, a section, or any JSON-able value."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_file_keys(path: str | Path) -> set[str]:
    """The ``section.key`` names a config file sets (without the defaults :func:`load_config` fills in)."""
    return set(_flatten(_read_file(Path(path))))


def flat_config(config: Config) -> dict[str, Any]:
    """``{"section.key": value}`` of every option of ``config``."""
    return _flatten(config_to_dict(config))


def diff_configs(a: Config, b: Config) -> list[str]:
    """Human-readable ``section.key: old -> new`` lines where ``a`` and ``b`` differ."""
    fa, fb = flat_config(a), flat_config(b)
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
