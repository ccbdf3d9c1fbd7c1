"""Shared fixtures. GPU tests are marked ``@pytest.mark.gpu`` and skip without ASTRA CUDA."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dipuq.data.phantoms import shepp_logan
from dipuq.geometry import Geometry
from dipuq.operators import RayTransform, cuda_available
from dipuq.operators.simulate import simulate_scan

# One thread: CI machines are shared and small; torch's intra-op threads on 2 busy cores measured
# 3-7x slower than one thread for these tiny problems.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("DIPUQ_DATA_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device with ASTRA's CUDA backend")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data mirror not found at {SHARED_DATA} (set DIPUQ_DATA_MIRROR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Each test module starts on one thread (see above) and leaves the count as it found it, so a
    test that changes it (the thread governor's) cannot slow the modules after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sparse2d():
    """Shepp–Logan 32², 12 parallel angles, 5 % Gaussian noise: ``(A, y, x_true, σ²)``."""
    geo = Geometry.parallel2d(np.linspace(0, np.pi, 12, endpoint=False), (32, 32))
    A = RayTransform(geo)
    scan = simulate_scan(shepp_logan((32, 32)), geo, noise_level=0.05, generator=torch.Generator().manual_seed(0))
    return A, torch.as_tensor(scan.projections), torch.as_tensor(scan.reference), scan.noise_std**2


def _psnr(x, ref):
    return float(10 * torch.log10(ref.max() ** 2 / (x - ref).square().mean()))


@pytest.fixture
def psnr():
    """``psnr(x, ref)``: peak signal-to-noise ratio of x against ref in dB, peak = max(ref)."""
    return _psnr
