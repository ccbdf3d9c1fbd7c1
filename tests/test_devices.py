"""Device handling a CUDA user meets, checked on CPU: checkpoints written on a GPU resumed on the
CPU, tensors on mixed devices, and CUDA out-of-memory as one line naming the size and the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dipuq.run import stages
from dipuq.cli import main
from dipuq.data.phantoms import shepp_logan
from dipuq.operators.simulate import simulate_scan
from dipuq.devices import check_same_device, oom_error, same_device
from dipuq.errors import DipuqError, GPUOutOfMemoryError
from dipuq.geometry import Geometry
from dipuq.run.rundir import RunDir

TINY = ["dip.iterations=10", "dip.network.scales=2", "dip.network.channels=4", "dip.network.skip_channels=1",
        "linearise.diag_probes=2", "posterior.em_rounds=1", "posterior.em_samples=2", "sampler.method=cg",
        "sampler.n_samples=2", "sampler.cg_max_iter=5", "sampler.chains_per_batch=2", "output.figures=false",
        "output.report=false", "output.tiff=false"]

TORCH_OOM = ("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
             "1.06 GiB is free. Including non-PyTorch memory, this process has 78.1 GiB memory in use.")


def _sets(extra=()):
    return [a for s in [*TINY, *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def scan2d(tmp_path_factory):
    g = Geometry.parallel2d(np.linspace(0, np.pi, 12, endpoint=False), (16, 16))
    scan = simulate_scan(shepp_logan((16, 16)), g, noise="gaussian", noise_level=0.02,
                         generator=torch.Generator().manual_seed(0), name="tiny")
    path = tmp_path_factory.mktemp("scans") / "tiny.npz"
    scan.save(path)
    return path


# -- out of memory --------------------------------------------------------------------------------


def test_oom_message_names_size_and_keys():
    msg = str(oom_error(torch.cuda.OutOfMemoryError(TORCH_OOM), stage="sampler", what="volume 128x128x128"))
    assert "\n" not in msg
    assert "stage 'sampler'" in msg and "volume 128x128x128" in msg
    assert "allocating 3.00 GiB failed" in msg and "79.19 GiB" in msg and "1.06 GiB free" in msg
    assert "--set sampler.chains_per_batch=<smaller>" in msg and "linearise.chunk_size" in msg
    lin = str(oom_error(torch.cuda.OutOfMemoryError(TORCH_OOM), stage="linearise"))
    assert "linearise.chunk_size=<smaller>" in lin and "linearise.batching=loop" in lin
    bare = str(oom_error(RuntimeError("CUDA out of memory")))  # no size in the message: still the keys
    assert "sampler.chains_per_batch" in bare


def test_pipeline_oom_is_one_line_exit_2(scan2d, tmp_path, monkeypatch, capsys):
    def boom(ctx, cfg):
        raise torch.cuda.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(stages.stage("linearise"), "run", boom)
    rc = main(["reconstruct", str(scan2d), "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu", *_sets()])
    err = capsys.readouterr().err
    assert rc == 2
    line = [ln for ln in err.splitlines() if ln.startswith("dipuq: error:")]
    assert len(line) == 1 and "Traceback" not in err
    assert "stage 'linearise'" in line[0] and "allocating 3.00 GiB failed" in line[0]
    assert "linearise.chunk_size" in line[0] and "volume 16x16" in line[0]
    with pytest.raises(GPUOutOfMemoryError):  # --debug shows the error itself
        main(["--debug", "reconstruct", str(scan2d), "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu",
              *_sets()])


def test_cli_oom_outside_the_pipeline(monkeypatch, capsys):
    import dipuq.commands.info as info

    def boom(args):
        raise torch.cuda.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(info, "main", boom)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "allocating 3.00 GiB failed" in err and "Traceback" not in err


def test_other_runtime_errors_still_raise(monkeypatch):
    import dipuq.commands.info as info

    monkeypatch.setattr(info, "main", lambda args: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["info"])


# -- checkpoints from another device --------------------------------------------------------------


def test_run_written_on_cuda_resumes_on_cpu(scan2d, tmp_path, monkeypatch):
    """Every checkpoint tagged 'cuda:0' (as torch.save writes them on a GPU) still resumes on a CPU."""
    import torch.serialization as ser

    monkeypatch.setattr(ser, "location_tag", lambda storage: "cuda:0")
    run = tmp_path / "run"
    assert main(["reconstruct", str(scan2d), "--out", str(run), "--quiet", "--device", "cpu", *_sets()]) == 0
    monkeypatch.undo()
    dip_pt = next(run.glob("stages/*dip/dip.pt"))
    if not torch.cuda.is_available():  # the fake is real: a plain load refuses these files here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(dip_pt, weights_only=True)
    std0 = np.load(run / "std.npy")
    rd = RunDir(run, stages.STAGE_NAMES)
    # resume at the sampler: loads the scan, DIP weights, g-prior scales and posterior checkpoints
    for s in stages.STAGE_NAMES[stages.STAGE_NAMES.index("sampler"):]:
        (rd.stage_dir(s) / rd.MARKER).unlink()
    assert main(["reconstruct", str(scan2d), "--out", str(run), "--quiet", "--device", "cpu", *_sets()]) == 0
    np.testing.assert_allclose(np.load(run / "std.npy"), std0, rtol=1e-5, atol=1e-7)
    # resume at the maps: loads the sample moments
    for s in stages.STAGE_NAMES[stages.STAGE_NAMES.index("maps"):]:
        (rd.stage_dir(s) / rd.MARKER).unlink()
    assert main(["reconstruct", str(scan2d), "--out", str(run), "--quiet", "--device", "cpu", *_sets()]) == 0
    assert json.loads((run / "provenance.json").read_text())["resumed_from"] == "maps"


# -- mixed devices --------------------------------------------------------------------------------


def test_same_device():
    assert same_device("cpu", torch.device("cpu"))
    assert not same_device("cpu", "meta")
    assert same_device("cuda:0", "cuda:0") and not same_device("cuda:0", "cuda:1")


def test_check_same_device_names_both():
    x = torch.zeros(2)
    assert check_same_device("f", a=x, b=torch.nn.Linear(2, 2), c=None) == torch.device("cpu")
    with pytest.raises(DipuqError, match=r"f: inputs are on different devices \(a on cpu, b on meta\)"):
        check_same_device("f", a=x, b=torch.zeros(2, device="meta"))


def test_ray_transform_refuses_other_device():
    from dipuq.operators import RayTransform

    A = RayTransform(Geometry.parallel2d(np.linspace(0, np.pi, 4, endpoint=False), (8, 8)))
    with pytest.raises(DipuqError, match="lives on cpu, got a tensor on meta; move it with x.to"):
        A(torch.zeros(8, 8, device="meta"))


def test_linearised_model_refuses_mixed_devices():
    from dipuq.posterior.linearise import LinearisedModel
    from dipuq.dip.networks import UNet

    net = UNet(ndim=2, scales=1, channels=2, skip_channels=0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DipuqError, match="LinearisedModel: inputs are on different devices"):
        LinearisedModel(net, torch.zeros(1, 1, 8, 8, device="meta"))


def test_fit_dip_refuses_net_on_other_device():
    from dipuq.dip.fit import DipConfig, fit_dip
    from dipuq.dip.networks import UNet
    from dipuq.operators import RayTransform

    A = RayTransform(Geometry.parallel2d(np.linspace(0, np.pi, 4, endpoint=False), (8, 8)))
    net = UNet(ndim=2, scales=1, channels=2, skip_channels=0, generator=torch.Generator().manual_seed(0)).to("meta")
    with pytest.raises(DipuqError, match="fit_dip: inputs are on different devices"):
        next(fit_dip(net, A, torch.zeros(A.range_shape), torch.zeros(1, 1, 8, 8), DipConfig(gamma=0.0)))
