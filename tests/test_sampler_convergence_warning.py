"""A run whose sampler stops far from convergence says so (stderr and metrics.json)."""

import json

import numpy as np
import torch

from dipuq.cli import main
from dipuq.data.phantoms import shepp_logan
from dipuq.operators.simulate import simulate_scan
from dipuq.geometry import Geometry

TINY = ["--set", "dip.iterations=20", "--set", "dip.network.scales=2", "--set", "dip.network.channels=8",
        "--set", "posterior.em_rounds=0", "--set", "sampler.n_samples=4", "--set", "sampler.precond_rank=0",
        "--set", "output.figures=false", "--set", "output.report=false"]


def test_unconverged_sampler_warns(tmp_path, capsys):
    g = Geometry.parallel2d(np.linspace(0, np.pi, 10, endpoint=False), (20, 20))
    scan = simulate_scan(shepp_logan((20, 20)), g, noise="gaussian", generator=torch.Generator().manual_seed(0))
    scan.save(tmp_path / "tiny.npz")
    # 3 unpreconditioned Nesterov steps cannot converge: the gradient norm stays above 0.1 of its start.
    assert main(["reconstruct", str(tmp_path / "tiny.npz"), "--out", str(tmp_path / "short"), *TINY,
                 "--set", "sampler.n_steps=3"]) == 0
    err = capsys.readouterr().err
    assert "samples are not converged" in err
    metrics = json.loads((tmp_path / "short" / "metrics.json").read_text())
    assert metrics["sampler_relative_residual"] > 0.1
