"""Shared fixtures. GPU tests are marked ``@pytest.mark.gpu`` and skip without ASTRA CUDA."""

import os
from pathlib import Path

import pytest
import torch

# One thread: CI machines are shared and small; torch's intra-op threads on 2 busy cores measured
# 3-7x slower than one thread for these tiny problems.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("DIPUQ_DATA_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "data"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _gpu_available() -> bool:
    from dipuq.operators import cuda_available

    return cuda_available()


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _gpu_available():
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
