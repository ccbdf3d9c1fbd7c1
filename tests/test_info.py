"""`dipuq info`: what a bug report needs, on any machine, never touching ASTRA CUDA without a device."""

import json
import subprocess
import sys

import pytest
import torch

from dipuq.cli import main
from dipuq.operators import _astra


def test_info_text(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DIPUQ_DATA_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("DIPUQ_CACHE", str(tmp_path / "cache"))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("dipuq", "torch", "astra", "backends", "auto picks", "threads", "data cache", "data mirror",
                 "diamond-24737", "tooth"):
        assert word in out
    assert str(tmp_path / "cache") in out and "(folder does not exist)" in out
    assert "cpu-cone" in out  # always usable


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"dipuq", "versions", "torch", "astra", "backends", "threads", "data"}
    assert "cpu-cone" in info["backends"]["usable"]
    assert info["backends"]["auto"]["3d cone"] in ("astra-cuda", "cpu-cone")
    assert info["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()


def test_info_without_cuda_never_calls_astra_cuda(capsys, monkeypatch):
    """With torch seeing no CUDA device, neither astra.use_cuda nor get_gpu_info may run (SIGFPE)."""
    astra = _astra._lib()

    def forbidden(*a, **k):
        raise AssertionError("an ASTRA CUDA function was called without a CUDA device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(astra, "use_cuda", forbidden)
    monkeypatch.setattr(astra, "get_gpu_info", forbidden)
    _astra.cuda_available.cache_clear()
    try:
        assert main(["info", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
    finally:
        _astra.cuda_available.cache_clear()
    assert info["astra"]["cuda_usable"] is False and "not probed" in info["astra"]["cuda_note"]
    assert "astra-cuda" not in info["backends"]["usable"]
    assert info["torch"]["devices"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only output")
def test_info_subprocess_cpu_only():
    proc = subprocess.run([sys.executable, "-m", "dipuq", "info"], capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "CUDA device available: no" in proc.stdout and "CUDA backend usable: no" in proc.stdout


def test_help_lists_info(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "info" in capsys.readouterr().out
