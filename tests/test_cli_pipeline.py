"""End-to-end CLI runs on tiny scans: outputs, resume after an interrupt, bad input, `show`.

Sizes are tiny (2D 32², 3D 16³ cone beam, a 2-scale U-Net with 4 channels, a few iterations)
so each run takes a few seconds; the numbers are not meant to be good reconstructions, only
well-formed ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dipuq.run import stages
from dipuq.cli import main
from dipuq.data.phantoms import shepp_logan
from dipuq.operators.simulate import simulate_scan
from dipuq.geometry import Geometry

TINY = [
    "dip.iterations=40", "dip.network.scales=2", "dip.network.channels=4", "dip.network.skip_channels=1",
    "linearise.diag_probes=4", "posterior.em_rounds=1", "posterior.em_samples=2",
    "sampler.n_samples=4", "sampler.n_steps=10", "sampler.chains_per_batch=2", "sampler.power_iters=5",
    "output.report_slices=4",
]


def _sets(extra=()):
    out = []
    for s in [*TINY, *extra]:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def scan2d(tmp_path_factory):
    g = Geometry.parallel2d(np.linspace(0, np.pi, 20, endpoint=False), (32, 32))
    scan = simulate_scan(shepp_logan((32, 32)), g, noise="gaussian", noise_level=0.02,
                         generator=torch.Generator().manual_seed(0), name="tiny2d")
    path = tmp_path_factory.mktemp("scans") / "tiny2d.npz"
    scan.save(path)
    return path


@pytest.fixture(scope="module")
def scan3d(tmp_path_factory):
    g = Geometry.cone3d(np.linspace(0, 2 * np.pi, 10, endpoint=False), (16, 16, 16), (20, 24),
                        source_origin=64.0, origin_detector=32.0, det_spacing=1.5)
    scan = simulate_scan(shepp_logan((16, 16, 16)), g, noise="gaussian", noise_level=0.02,
                         generator=torch.Generator().manual_seed(0), name="tiny3d")
    path = tmp_path_factory.mktemp("scans") / "tiny3d.npz"
    scan.save(path)
    return path


def _check_run(run, shape):
    import tifffile

    for name in ("config.toml", "provenance.json", "recon.npy", "std.npy", "recon.tif", "std.tif",
                 "metrics.json", "report.html", "figures/slices.png", "figures/calibration.png",
                 "figures/std_vs_error.png", "figures/dip_loss.png"):
        assert (run / name).is_file(), name
    recon, std = np.load(run / "recon.npy"), np.load(run / "std.npy")
    assert recon.shape == std.shape == shape
    assert np.isfinite(recon).all() and np.isfinite(std).all() and (std > 0).all()
    with tifffile.TiffFile(run / "std.tif") as tif:
        assert tif.is_imagej
        arr = tif.asarray()
    assert arr.dtype == np.float32 and arr.shape == shape
    np.testing.assert_array_equal(arr, std)
    m = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(m["psnr"]) and m["psnr"] > 0
    for k in ("coverage_50", "coverage_90", "coverage_95"):
        assert 0 <= m[k] <= 1
    assert m["coverage_50"] <= m["coverage_90"] <= m["coverage_95"]  # nested intervals
    assert 0 <= m["calibration_error"] <= 1 and m["n_samples"] == 4
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["status"] == "complete" and prov["seed"] == 0 and prov["device"] == "cpu"
    assert set(prov["timings_s"]) == set(stages.STAGE_NAMES)
    assert prov["versions"]["torch"] == torch.__version__
    for stage in stages.STAGE_NAMES:
        assert list(run.glob(f"stages/*_{stage}/done.json")), stage
    assert not list(run.rglob(".*tmp*")), "temporary files left behind"
    html = (run / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained


def test_reconstruct_2d(scan2d, tmp_path, capsys):
    run = tmp_path / "run2d"
    assert main(["reconstruct", str(scan2d), "--out", str(run), "--device", "cpu", *_sets()]) == 0
    _check_run(run, (32, 32))
    out = capsys.readouterr()
    assert "report.html" in out.out and "[3/12] dip" in out.err
    # the resolved config reloads to the same configuration
    from dipuq.run.config import load_config

    cfg = load_config(run / "config.toml")
    assert cfg.dip.iterations == 40 and cfg.sampler.n_samples == 4 and cfg.dip.network.channels == 4
    # EM starts from the data-driven g (g_init = 0): mean((θ*/s)²) of the fitted net
    em = json.loads(next(run.glob("stages/*_posterior/em.json")).read_text())
    assert cfg.posterior.g_init == 0 and em["g_trace"][0] != 1.0 and em["g_trace"][0] > 0
    sampling = json.loads(next(run.glob("stages/*_sampler/sampling.json")).read_text())
    assert sampling["solver"]["precond_rank"] >= 1 and "kappa" in sampling["solver"]
    # a second identical command finds nothing to do
    assert main(["reconstruct", str(scan2d), "--out", str(run), "--device", "cpu", *_sets()]) == 0
    assert "nothing to do" in capsys.readouterr().err
    # show: the three kinds of figure, and a bad slice
    assert main(["show", str(run)]) == 0
    assert (run / "figures" / "show_image.png").stat().st_size > 10_000
    assert main(["show", str(run), "--axis", "y"]) == 2
    assert "2D" in capsys.readouterr().err


def test_reconstruct_3d_and_show(scan3d, tmp_path, capsys):
    run = tmp_path / "run3d"
    assert main(["reconstruct", str(scan3d), "--out", str(run), "--device", "cpu", "--quiet", *_sets()]) == 0
    _check_run(run, (16, 16, 16))
    assert json.loads((run / "provenance.json").read_text())["backend"] == "cpu-cone"
    assert not (run / "stages" / "03_dip" / "fit.ckpt").exists()  # the in-stage checkpoint is gone once done
    for argv, name in ((["show", str(run)], "show_center.png"),
                       (["show", str(run), "--axis", "z", "--slice", "3"], "show_z3.png")):
        assert main(argv) == 0
        assert (run / "figures" / name).is_file()
    assert main(["show", str(run), "--axis", "x", "--out", str(tmp_path / "sag.png")]) == 0
    assert (tmp_path / "sag.png").is_file()
    capsys.readouterr()
    assert main(["show", str(run), "--axis", "z", "--slice", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dipuq: error:") and "outside axis z (0..15)" in err and err.count("\n") == 1


def test_resume_after_interrupt(scan2d, tmp_path, monkeypatch, capsys):
    """Interrupt inside the sampler after its first batch; the rerun recomputes neither the
    earlier stages nor the finished batch, and gives the same std map as an uninterrupted run."""
    from dipuq import samplers
    run = tmp_path / "interrupted"
    argv = ["reconstruct", str(scan2d), "--out", str(run), "--device", "cpu", *_sets()]
    real_sample = samplers.Sampler.sample
    batches, interrupt = [], [True]

    def interrupting(self, post, *a, chains=None, **kw):
        if chains is not None:  # the sampler stage (EM calls sample with n_samples instead)
            batches.append(list(chains))
            if chains[0] == 2 and interrupt[0]:
                raise KeyboardInterrupt
        return real_sample(self, post, *a, chains=chains, **kw)

    monkeypatch.setattr(samplers.Sampler, "sample", interrupting)
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert batches == [[0, 1], [2, 3]]
    assert list(run.glob("stages/*_posterior/done.json")) and not list(run.glob("stages/*_sampler/done.json"))
    assert not (run / "std.npy").exists()

    # rerun: earlier stages must be loaded, not recomputed
    def boom(*a, **kw):
        raise AssertionError("a finished stage was recomputed")

    import dipuq.dip.driver
    import dipuq.posterior.gprior

    monkeypatch.setattr(dipuq.dip.driver, "run_dip", boom)
    monkeypatch.setattr(dipuq.posterior.gprior, "gprior_scale", boom)
    monkeypatch.setattr(samplers, "iterate_em", boom)
    batches.clear()
    interrupt[0] = False
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "continuing from 'sampler'" in err
    assert batches == [[2, 3]], "the finished batch of chains was sampled again"
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["resumed_from"] == "sampler"

    # the same command without interruption gives the same numbers
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    assert main(["reconstruct", str(scan2d), "--out", str(fresh), "--device", "cpu", "--quiet", *_sets()]) == 0
    np.testing.assert_array_equal(np.load(run / "recon.npy"), np.load(fresh / "recon.npy"))
    # Moments are float64 sums over the same chains in the same batches: bit-identical
    np.testing.assert_array_equal(np.load(run / "std.npy"), np.load(fresh / "std.npy"))


def test_changed_scan_or_seed_needs_force(scan2d, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    base = ["reconstruct", str(scan2d), "--out", str(run), "--device", "cpu", "--quiet"]
    monkeypatch.setattr(stages.stage("fbp"), "run", _interrupt)
    assert main([*base, *_sets()]) == 130  # leaves a started run (scan stage done)
    capsys.readouterr()
    # a config change is accepted and recomputes from the first stage that reads it: [data] -> the scan stage
    assert main(["reconstruct", str(scan2d), "--out", str(run), "--device", "cpu", *_sets(["data.angles=10"])]) == 130
    err = capsys.readouterr().err
    assert "data.angles: 0 -> 10" in err and "recomputing from 'scan'" in err and "reusing" not in err
    assert json.loads(next(run.glob("stages/*_scan/done.json")).read_text())["summary"]["projections"][0] == 10
    monkeypatch.undo()
    assert main([*base, *_sets(["data.angles=10"]), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed 0 (now 3)" in err and "--force" in err
    other = tmp_path / "other.npz"
    g = Geometry.parallel2d(np.linspace(0, np.pi, 20, endpoint=False), (32, 32))
    simulate_scan(shepp_logan((32, 32)) * 2, g, noise=None, name="other").save(other)
    assert main(["reconstruct", str(other), *base[2:], *_sets(["data.angles=10"])]) == 2
    assert "a different scan (tiny2d)" in capsys.readouterr().err
    # --force starts over (interrupt again right after the scan stage to keep this fast)
    monkeypatch.setattr(stages.stage("fbp"), "run", _interrupt)
    assert main([*base, *_sets(["dip.iterations=41"]), "--force"]) == 130
    assert "iterations = 41" in (run / "config.toml").read_text()


def _stage_file(run, stage, name):
    return next(run.glob(f"stages/*_{stage}/{name}"))


def test_resume_by_dependency(scan2d, tmp_path, monkeypatch, capsys):
    """A changed sampler key reuses the DIP fit (and gives what a fresh run with that config gives);
    a changed DIP key recomputes from the DIP on, reusing the scan and FBP stages."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    base = ["reconstruct", str(scan2d), "--device", "cpu"]
    assert main([*base, "--out", str(run), "--quiet", *_sets()]) == 0
    dip_pt = _stage_file(run, "dip", "dip.pt").read_bytes()
    capsys.readouterr()

    def boom(*a, **kw):
        raise AssertionError("the DIP was refitted")

    monkeypatch.setattr(stages.stage("dip"), "run", boom)
    assert main([*base, "--out", str(run), *_sets(["sampler.n_samples=6"])]) == 0
    err = capsys.readouterr().err
    assert "sampler.n_samples: 4 -> 6" in err
    assert "reusing scan, fbp, dip, linearise; recomputing from 'posterior'" in err
    assert _stage_file(run, "dip", "dip.pt").read_bytes() == dip_pt
    monkeypatch.undo()
    assert main([*base, "--out", str(fresh), "--quiet", *_sets(["sampler.n_samples=6"])]) == 0
    for name in ("recon.npy", "std.npy"):  # reused stages are exactly what a fresh run computes
        np.testing.assert_array_equal(np.load(run / name), np.load(fresh / name))
    assert json.loads((run / "metrics.json").read_text())["n_samples"] == 6

    fbp = json.loads(_stage_file(run, "fbp", "done.json").read_text())["finished"]
    assert main([*base, "--out", str(run), *_sets(["sampler.n_samples=6", "dip.iterations=30"])]) == 0
    err = capsys.readouterr().err
    assert "reusing scan, fbp; recomputing from 'dip'" in err
    assert json.loads(_stage_file(run, "dip", "done.json").read_text())["summary"]["iterations"] == 30
    assert json.loads(_stage_file(run, "fbp", "done.json").read_text())["finished"] == fbp  # not rerun
    assert _stage_file(run, "dip", "dip.pt").read_bytes() != dip_pt


def test_a_run_made_before_an_option_existed_recomputes_the_stages_reading_it(scan2d, tmp_path, capsys):
    """A newer dipuq's option (default: perhaps new behaviour) that the run's config.toml lacks counts
    as a change: the stages reading its section rerun instead of being trusted."""
    run = tmp_path / "run"
    base = ["reconstruct", str(scan2d), "--device", "cpu", "--out", str(run)]
    assert main([*base, "--quiet", *_sets()]) == 0
    cfg = run / "config.toml"
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if not line.startswith("bootstrap ")) + "\n")
    req = run / "stages" / "request.json"  # ... and its config digest was that of a config without the option
    req.write_text(json.dumps({**json.loads(req.read_text()), "config": "0" * 16}))
    capsys.readouterr()
    assert main([*base, *_sets()]) == 0
    err = capsys.readouterr().err
    assert "calibration.bootstrap: (new option)" in err and "recomputing from 'calibrate'" in err


def _interrupt(ctx, section):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reconstruct", "{missing}", "--out", "{out}"], "no such scan file"),
        (["reconstruct", "{txt}", "--out", "{out}"], "unknown scan file type"),
        (["reconstruct", "{scan}", "--out", "{out}", "--set", "dip.iteratons=5"], "did you mean 'iterations'"),
        (["reconstruct", "{scan}", "--out", "{out}", "--set", "sampler.n_samples=-3"], "sampler.n_samples must be >= 1"),
        (["reconstruct", "{scan}", "--out", "{out}", "--set", "dip.lr=fast"], "dip.lr must be a number"),
        (["reconstruct", "{scan}", "--out", "{out}", "--set", "nosuch"], "section.key=value"),
        (["reconstruct", "{scan}", "--out", "{out}", "--seed", "-1"], "--seed must be a non-negative integer"),
        (["reconstruct", "{scan}", "--out", "{out}", "--config", "{badcfg}"], "unknown section [dipp]"),
        (["reconstruct", "{scan}", "--out", "{out}", "--config", "{missing}.toml"], "config file not found"),
        (["reconstruct", "{scan}", "--out", "{out}", "--backend", "magic"], "unknown ray-transform backend"),
        (["reconstruct", "{scan}", "--out", "{txt}"], "not a folder"),
        (["reconstruct", "{scan}", "--out", "{full}"], "not a dipuq run directory"),
        (["show", "{missing}"], "run directory not found"),
        (["show", "{full}"], "not a finished dipuq run"),
    ],
)
def test_bad_input_one_line_exit_2(argv, message, scan2d, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "bad.toml").write_text("[dipp]\niterations = 3\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("keep me")
    subs = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out"), "txt": str(tmp_path / "notes.txt"),
            "scan": str(scan2d), "badcfg": str(tmp_path / "bad.toml"), "full": str(tmp_path / "full")}
    argv = [a.format(**subs) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dipuq: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert (tmp_path / "full" / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("command", ["reconstruct", "show", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dipuq " + command) and "examples:" in out


def test_demo_quick_settings_are_valid():
    """The demo presets are valid configs (the demo itself is timed in the report, not here)."""
    from dipuq.commands.demo import SETTINGS, demo_scan
    from dipuq.run.config import load_config

    for n, views, noise, preset in SETTINGS.values():
        cfg = load_config(None).replace(preset)
        assert cfg.sampler.n_samples >= 1
    scan = demo_scan(16, 12, 0.02)
    assert scan.geometry.beam == "cone" and scan.reference.shape == (16, 16, 16) and scan.noise_std > 0
