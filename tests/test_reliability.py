"""Run directories that cannot be corrupted (issue #13): hostile input, damaged checkpoints, locks.

Each case either succeeds with outputs bit-identical to an undamaged run (exit 0) or fails with one
line on stderr and exit code 2 — never a traceback, never a non-finite std map. Tiny 2D runs (16²,
12 angles, 20 DIP iterations) keep every rerun to a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from dipuq.cli import main
from dipuq.data.phantoms import shepp_logan
from dipuq.operators.simulate import simulate_scan
from dipuq.geometry import Geometry
from dipuq.run import stages
from dipuq.run.rundir import LOCK_FILE, RunLock

TINY = [
    "dip.iterations=20", "dip.network.scales=2", "dip.network.channels=4", "dip.network.skip_channels=1",
    "linearise.diag_probes=4", "posterior.em_rounds=1", "posterior.em_samples=2",
    "sampler.n_samples=4", "sampler.n_steps=10", "sampler.chains_per_batch=2", "sampler.power_iters=5",
    "output.report_slices=4", "output.figures=false",
]


def _argv(scan, run, *extra):
    out = ["reconstruct", str(scan), "--out", str(run), "--device", "cpu", "--quiet"]
    for s in TINY:
        out += ["--set", s]
    return out + list(extra)


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory):
    g = Geometry.parallel2d(np.linspace(0, np.pi, 12, endpoint=False), (16, 16))
    scan = simulate_scan(shepp_logan((16, 16)), g, noise="gaussian", noise_level=0.02,
                         generator=torch.Generator().manual_seed(0), name="tiny16")
    path = tmp_path_factory.mktemp("scan") / "tiny16.npz"
    scan.save(path)
    return path


@pytest.fixture(scope="module")
def finished(scan_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(_argv(scan_path, run)) == 0
    return run


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("dipuq: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# -- bad scan files -------------------------------------------------------------------------
def _variant(scan_path, tmp_path, name, drop=(), **changes):
    d = dict(np.load(scan_path))
    for k in drop:
        d.pop(k)
    d.update(changes)
    out = tmp_path / f"{name}.npz"
    np.savez(out, **d)
    return out


@pytest.mark.parametrize("name, changes, needles", [
    ("F1_huge2d", dict(volume_shape=np.array([100000, 100000])), ["would need about", "GiB", "available", "data.bin"]),
    ("F2_huge3d", dict(volume_shape=np.array([4000, 4000, 4000]), projections=np.zeros((12, 4, 23), np.float32),
                       det_spacing=np.array([1.0, 1.0])), ["would need about", "TiB", "available"]),
    ("F3_degrees", dict(angles=np.linspace(0, 165, 12)), ["look like degrees", "angles_deg"]),
    ("F5_string", dict(volume_shape=np.array("32x32")), ["'volume_shape'"]),
    ("fractional", dict(volume_shape=np.array([16.5, 16.0])), ["'volume_shape' must be positive whole numbers"]),
    ("cor_offset", dict(cor_offset=np.array(1e6)), ["no detector ray passes through the volume", "cor_offset"]),
])
def test_bad_scan_refused_up_front(name, changes, needles, scan_path, tmp_path, capsys):
    bad = _variant(scan_path, tmp_path, name, drop=("reference",) if "F1" in name or "F2" in name else (), **changes)
    t0 = time.perf_counter()
    assert main(_argv(bad, tmp_path / "run")) == 2
    assert time.perf_counter() - t0 < 2.0  # refused before any work (F1 used to die after ~50 s at 13 GB)
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


def test_truncated_scan_file(scan_path, tmp_path, capsys):
    data = scan_path.read_bytes()
    for i, cut in enumerate((len(data) // 2, len(data) - 30, 10)):
        bad = tmp_path / f"trunc{i}.npz"
        bad.write_bytes(data[:cut])
        assert main(_argv(bad, tmp_path / "run")) == 2
        _one_line_error(capsys, "truncated or corrupt")


def test_memory_guard_on_operator(monkeypatch):
    """The guard sits in RayTransform itself (API users too) and honours DIPUQ_MEMORY_LIMIT."""
    from dipuq.memory import MemoryGuardError, available_bytes
    from dipuq.operators import RayTransform

    g = Geometry.parallel2d(np.linspace(0, np.pi, 12, endpoint=False), (64, 64))
    RayTransform(g, backend="astra-cpu")  # fits
    monkeypatch.setenv("DIPUQ_MEMORY_LIMIT", "1M")
    assert available_bytes() == 2**20
    with pytest.raises(MemoryGuardError, match="would need about .* but only 1 MiB is available"):
        RayTransform(g, backend="cpu-cone")


def test_angles_within_one_turn_are_radians(scan_path, tmp_path):
    """A full 0..2π scan (last angle 2π included) is not mistaken for degrees."""
    from dipuq.data.scan import Scan

    d = dict(np.load(scan_path))
    d["angles"] = np.linspace(0, 2 * np.pi, 12)
    Scan.from_arrays(d)


# -- lock -----------------------------------------------------------------------------------
def test_second_process_refused_naming_pid(scan_path, tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):
        assert main(_argv(scan_path, run, "--force", "--seed", "1")) == 2
        _one_line_error(capsys, f"PID {os.getpid()}", "in use")
        assert (run / LOCK_FILE).exists()
    assert not run.exists()  # the lock made the folder and nothing else was written: removed again


def test_stale_lock_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": dead.pid}))
    (run / "keep.txt").write_text("x")
    with RunLock(run) as lock:
        assert lock.stale_pid == dead.pid
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_released_when_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from dipuq.run.rundir import RunLock; l = RunLock(sys.argv[1]).__enter__(); "
            "open(sys.argv[1] + '/x', 'w').write('x'); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    from dipuq.errors import DipuqError

    with pytest.raises(DipuqError, match=f"PID {p.pid}"):
        RunLock(run).__enter__()
    p.kill()
    p.wait()
    with RunLock(run) as lock:
        assert lock.stale_pid == p.pid


# -- damaged run directories: detected, recomputed, identical -------------------------------
def _damage(path, how, rng):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip 40 bytes in the middle half
        lo, hi = len(data) // 4, max(len(data) // 4 + 1, 3 * len(data) // 4)
        for i in rng.choice(np.arange(lo, hi), size=min(40, hi - lo), replace=False):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))


def _rerun_and_check(finished, scan_path, tmp_path, capsys, rel, how, drop_later=False):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    target = run / rel
    _damage(target, how, np.random.default_rng(zlib.crc32(f"{rel}:{how}".encode())))
    if drop_later:  # F8: later stages' markers removed, so the resume starts right after the damaged one
        stage = int(rel.split("/")[1][:2])
        for m in run.glob("stages/*/done.json"):
            if int(m.parent.name[:2]) > stage:
                m.unlink()
    rc = main(_argv(scan_path, run))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 2:
        err = "\n".join(line for line in err.splitlines() if "cannot be trusted" not in line) + "\n"
        assert err.startswith("dipuq: error: ") and err.count("\n") == 1, err
        return rc, err
    assert rc == 0, err
    std = np.load(run / "std.npy")
    assert np.isfinite(std).all()
    for name in ("recon.npy", "std.npy"):
        np.testing.assert_array_equal(np.load(run / name), np.load(finished / name), err_msg=f"{rel} {how}: {name}")
    for m in finished.glob("stages/*/done.json"):  # every stage is done again, its files checksummed
        # (the names, not the digests: sampling.json records timings, so its bytes differ)
        assert set(json.loads((run / m.relative_to(finished)).read_text())["files"]) == set(json.loads(m.read_text())["files"])
    assert run.joinpath("stages").is_dir() and not list(run.rglob(".*tmp*"))
    return rc, err


# one checkpoint of each stage type, truncated and flipped, plus the top-level outputs (F6, F7, F8)
CASES = [
    ("stages/01_scan/scan.npz", "truncate", False),
    ("stages/02_fbp/fbp.npy", "truncate", False),
    ("stages/03_dip/dip.pt", "flip", False),
    ("stages/04_linearise/scale.pt", "truncate", False),
    ("stages/05_posterior/posterior.pt", "flip", False),
    ("stages/06_sampler/moments.pt", "flip", True),
    ("stages/07_calibrate/calibration.json", "flip", False),
    ("stages/09_maps/maps.npz", "truncate", False),
    ("std.npy", "truncate", False),
    ("recon.tif", "flip", False),
]


@pytest.mark.parametrize("rel, how, drop_later", CASES)
def test_damaged_file_recomputed(rel, how, drop_later, finished, scan_path, tmp_path, capsys):
    rc, err = _rerun_and_check(finished, scan_path, tmp_path, capsys, rel, how, drop_later)
    assert rc == 0
    stage = next(p.parent.name.split("_", 1)[1] for p in sorted(finished.glob("stages/*/done.json"))
                 if rel in json.loads(p.read_text())["files"])
    assert f"stage '{stage}' cannot be trusted" in err and "recomputing" in err


def _all_files(run):
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE)


def test_fuzz_sample(finished, scan_path, tmp_path, capsys):
    """Every file type of a finished run, damaged in turn (a fixed-seed sample; the exhaustive
    variant is ``test_fuzz_exhaustive``): exit 0 with identical outputs, or 2 with one line."""
    files = _all_files(finished)
    rng = np.random.default_rng(13)
    picks = sorted({files[i] for i in rng.choice(len(files), size=min(5, len(files)), replace=False)}
                   | {"stages/request.json", "stages/05_posterior/done.json", "provenance.json"})
    for i, rel in enumerate(picks):
        how = ("truncate", "flip")[i % 2]
        case = tmp_path / f"case{i}"
        case.mkdir()
        _rerun_and_check(finished, scan_path, case, capsys, rel, how)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_fuzz_exhaustive(how, finished, scan_path, tmp_path, capsys):
    for i, rel in enumerate(_all_files(finished)):
        case = tmp_path / f"case{i}"
        case.mkdir()
        _rerun_and_check(finished, scan_path, case, capsys, rel, how)


def test_failed_run_rerun_with_corrected_config(scan_path, tmp_path, monkeypatch, capsys):
    """A run that failed in the maps stage reruns with a corrected [output] config without
    --force, reusing the finished stages (resume by dependency: nothing before the maps reruns)."""
    run = tmp_path / "run"

    def fail(ctx, section):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.stage("maps"), "run", fail)
    assert main(_argv(scan_path, run)) == 130
    monkeypatch.undo()
    capsys.readouterr()

    def boom(*a, **kw):
        raise AssertionError("a finished stage was recomputed")

    import dipuq.dip.driver
    from dipuq import samplers
    monkeypatch.setattr(dipuq.dip.driver, "run_dip", boom)
    monkeypatch.setattr(samplers.Sampler, "sample", boom)
    assert main(_argv(scan_path, run, "--set", "output.tiff=false")) == 0
    assert (run / "std.npy").is_file() and not (run / "std.tif").exists()
    assert np.isfinite(np.load(run / "std.npy")).all()
    assert "tiff = false" in (run / "config.toml").read_text()


def test_memory_guard_in_samplers(monkeypatch):
    """Dense oracles, Nyström sketches and vmap batches are refused in one line when they cannot fit."""
    from dipuq.posterior.linearise import LinearisedModel
    from dipuq.memory import MemoryGuardError
    from dipuq.dip.networks import UNet
    from dipuq.operators import RayTransform
    from dipuq.posterior.model import Posterior
    from dipuq.samplers import SamplerConfig, make_sampler

    g = Geometry.parallel2d(np.linspace(0, np.pi, 6, endpoint=False), (8, 8))
    A = RayTransform(g, backend="astra-cpu")
    gen = torch.Generator().manual_seed(0)
    from dipuq.run.config import load_config

    cfg = load_config(None, ["dip.network.scales=2", "dip.network.channels=2", "dip.network.skip_channels=1"])
    net = UNet.from_config(cfg.dip.network, ndim=2, generator=gen)
    model = LinearisedModel(net, torch.randn(1, 1, 8, 8, generator=gen), A)
    y = A(torch.randn(1, 1, 8, 8, generator=gen))
    post = Posterior(model, A, y, sigma2=0.01, g=1.0, scale=torch.ones(model.p))
    monkeypatch.setenv("DIPUQ_MEMORY_LIMIT", "1K")
    exact, sgd, cg = (make_sampler(m, SamplerConfig(n_steps=2)) for m in ("exact", "sgd", "cg"))
    for call, key in ((lambda: exact.dense(post), "max_dense"), (lambda: sgd.sample(post, 2, seed=0), "chains_per_batch"),
                      (lambda: cg.nystrom(post), "precond_rank")):
        with pytest.raises(MemoryGuardError, match=key):
            call()
    monkeypatch.delenv("DIPUQ_MEMORY_LIMIT")
    assert exact.dense(post)[0].shape == (64, model.p)  # fits without the cap
