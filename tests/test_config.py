"""Config: typed sections, unknown keys, type/range checks, overrides, TOML/YAML round trips."""

from __future__ import annotations


import pytest

from dipuq.run.config import (
    Config,
    DataConfig,
    DipConfig,
    NetworkConfig,
    SamplerConfig,
    SamplingConfig,
    apply_overrides,
    config_digest,
    config_to_dict,
    diff_configs,
    dumps_config,
    load_config,
    parse_override,
    save_config,
)
from dipuq.errors import ConfigError


def test_defaults_are_typed_sections():
    cfg = load_config()
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.dip, DipConfig)
    assert isinstance(cfg.dip.network, NetworkConfig)
    # the sampler section IS a samplers.SamplerConfig, so it is passed to make_sampler whole
    assert isinstance(cfg.sampler, SamplingConfig) and isinstance(cfg.sampler, SamplerConfig)
    assert cfg == Config()


def test_overrides_are_parsed_to_the_field_type():
    cfg = load_config(None, ["dip.iterations=200", "dip.lr=2.5e-3", "output.figures=false", "sampler.method=cg",
                             "data.crop_cols=[10, 20]", "dip.network.scales=3", "dip.network.channels=8,16,16",
                             "dip.sigma2=0.5", "operator.backend='astra-cpu'", "sampler.lr=none"])
    assert cfg.dip.iterations == 200 and type(cfg.dip.iterations) is int
    assert cfg.dip.lr == 2.5e-3 and cfg.output.figures is False and cfg.sampler.method == "cg"
    assert cfg.data.crop_cols == [10, 20]
    assert cfg.dip.network.channels == (8, 16, 16)
    assert cfg.dip.sigma2 == 0.5 and cfg.operator.backend == "astra-cpu" and cfg.sampler.lr is None
    # untouched keys keep their values
    assert cfg.dip.gamma == DipConfig().gamma and cfg.dip.network.groupnorm == NetworkConfig().groupnorm
    # dict overrides take typed values
    assert apply_overrides(cfg, {"sampler.n_samples": 7}).sampler.n_samples == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("dip.iteratons=5", "unknown key 'iteratons' in section [dip] (did you mean 'iterations'?)"),
        ("dip.network.chanels=3", "unknown key 'chanels' in section [dip.network] (did you mean 'channels'?)"),
        ("dipp.iterations=5", "unknown section [dipp] in override dipp.iterations (did you mean 'dip'?)"),
        ("sampler.n_samples=-3", "sampler.n_samples must be >= 1, got -3"),
        ("sampler.n_samples=2.5", "sampler.n_samples must be an integer"),
        ("dip.lr=fast", "dip.lr must be a number"),
        ("dip.lr=nan", "dip.lr must be finite"),
        ("output.figures=maybe", "output.figures must be true or false"),
        ("sampler.method=sdg", "(did you mean 'sgd'?)"),
        ("output.report_slices=0", "output.report_slices must be >= 1"),
        ("dip.iterations=0", "dip.iterations must be a positive integer"),  # DipConfig's own check
        ("dip.network.channels=8,16", "network.channels needs 4 entries"),
        ("sampler.momentum=1.0", "momentum must be in [0, 1)"),  # SamplerConfig's own check
        ("iterations=5", "must look like section.key=value"),
        ("dip.iterations", "must look like section.key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_file_round_trip_toml_and_yaml(tmp_path):
    cfg = load_config(None, ["dip.iterations=123", "dip.network.channels=[4, 8, 8, 8]", "sampler.n_samples=5",
                             "data.crop_cols=3,40", "posterior.noise=residual", "dip.sigma2=0.25"])
    for name in ("config.toml", "config.yaml"):
        path = save_config(cfg, tmp_path / name)
        back = load_config(path)
        assert back == cfg, diff_configs(cfg, back)
        assert config_digest(config_to_dict(back)) == config_digest(config_to_dict(cfg))
    text = (tmp_path / "config.toml").read_text()
    assert "[dip.network]" in text and "# keep this many evenly spaced projection angles" in text
    # the sampler's own keys (method, n_samples) come first in its table
    sampler_table = text.split("[sampler]")[1]
    assert sampler_table.index("method") < sampler_table.index("chains_per_batch")


def test_none_values_round_trip_through_toml(tmp_path):
    cfg = load_config()  # dip.sigma2 and sampler.lr default to None, which TOML cannot spell
    assert cfg.dip.sigma2 is None and cfg.sampler.lr is None
    assert load_config(save_config(cfg, tmp_path / "c.toml")) == cfg


def test_file_errors(tmp_path):
    bad = {
        "unknown.toml": ("[dip]\niterations = 10\nbogus = 1\n", "unknown key 'bogus' in section [dip]"),
        "section.toml": ("[sampling]\nn_samples = 3\n", "unknown section [sampling] (did you mean 'sampler'?)"),
        "type.yaml": ("dip:\n  iterations: ten\n", "dip.iterations must be an integer"),
        "table.toml": ("dip = 3\n", "section [dip] must be a table"),
        "broken.toml": ("[dip\niterations = 1\n", "invalid TOML"),
        "broken.yaml": ("dip: [1, 2\n", "invalid YAML"),
        "config.json": ("{}", "unknown config format '.json'"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_config(tmp_path / name)
        assert message in str(exc.value), name
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    # a float where an int is expected is an error in a file, an integral float is accepted
    (tmp_path / "float.toml").write_text("[dip]\niterations = 10.0\n")
    assert load_config(tmp_path / "float.toml").dip.iterations == 10


def test_file_then_overrides_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("dip:\n  iterations: 77\n  network:\n    scales: 2\nsampler:\n  n_samples: 3\n")
    cfg = load_config(tmp_path / "c.yaml", ["sampler.n_samples=9"])
    assert (cfg.dip.iterations, cfg.dip.network.scales, cfg.sampler.n_samples) == (77, 2, 9)
    # the Config-level default that differs from the section class default survives a file load
    assert cfg.dip.checkpoint_every == Config().dip.checkpoint_every == 100


def test_helpers():
    assert parse_override("dip.network.channels = 8") == (["dip", "network", "channels"], "8")
    a, b = load_config(), load_config(None, ["dip.iterations=5"])
    assert diff_configs(a, b) == [f"dip.iterations: {a.dip.iterations!r} -> 5"]
    assert config_digest(config_to_dict(a)) != config_digest(config_to_dict(b))
    assert dumps_config(a, "yaml").startswith("data:")
