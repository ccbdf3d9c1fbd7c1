"""benchmarks/gpu_check.py: runs to the end on CPU with every GPU part skipped with its reason, and
its GPU parts' own code runs on CPU stand-ins (cpu-cone on tiny volumes)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
GPU_PARTS = ("gpu_tests", "adjoint", "host_copies", "dip_timing", "sampler_step", "pipeline_diamond")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only skip paths")
def test_cpu_run_skips_every_gpu_part_with_reason(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == list(_load().PARTS)  # every part ran or was skipped, in order: the end was reached
    assert parts["environment"]["status"] == "ok"
    assert parts["environment"]["results"]["torch"]["cuda_available"] is False
    for name in GPU_PARTS:
        assert parts[name]["status"] == "skipped", name
        assert "no CUDA device" in parts[name]["reason"]
    assert parts["nccl"]["status"] == "skipped" and "≥ 2 CUDA devices" in parts["nccl"]["reason"]
    assert report["status"] == "ok"
    md = (out / "gpu_check.md").read_text()
    assert "| adjoint | skipped |" in md and "no CUDA device" in md
    # idempotent: a second run overwrites the same files
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--quick", "--only", "environment,nccl"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert list(json.loads((out / "gpu_check.json").read_text())["parts"]) == ["environment", "nccl"]


def test_bad_arguments_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown part(s) nope" in proc.stderr and "Traceback" not in proc.stderr


def test_budget_spent_skips_later_parts(tmp_path):
    gc = _load()
    assert gc.main(["--out", str(tmp_path), "--budget", "1e-9", "--only", "environment,nccl"]) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert all(p["status"] == "skipped" and "time budget spent" in p["reason"] for p in parts.values())


def test_memcpy_trace_parser(tmp_path):
    gc = _load()
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "args": {"bytes": 4096}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "args": {"bytes": 1 << 20}},
        {"cat": "kernel", "name": "k"}, {"cat": "cpu_op", "name": "aten::add"}]}))
    mc = gc._memcpy_from_trace(trace)
    assert mc["HtoD"] == [1, 4096] and mc["DtoH"] == [0, 0] and mc["DtoD"] == [1, 1 << 20]
    assert mc["cuda_events"] == 3  # two memcpys and a kernel; the CPU op is not CUDA activity


def test_failing_part_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    gc = _load()

    def boom(ctx):
        raise ValueError("broken on purpose")

    monkeypatch.setitem(gc.PARTS, "adjoint", ("adjoint", boom))
    monkeypatch.setattr(gc, "need_gpu", lambda: None)
    assert gc.main(["--out", str(tmp_path), "--only", "adjoint,nccl"]) == 1
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["adjoint"]["status"] == "failed" and "broken on purpose" in parts["adjoint"]["error"]
    assert parts["nccl"]["status"] == "skipped"


@pytest.fixture
def cpu_stand_in(monkeypatch):
    """gpu_check with its GPU parts pointed at cpu-cone on the CPU, at toy sizes."""
    gc = _load()
    monkeypatch.setattr(gc, "need_gpu", lambda: None)
    monkeypatch.setattr(gc, "DEVICE", "cpu")
    monkeypatch.setattr(gc, "BACKEND", "cpu-cone")
    monkeypatch.setattr(gc, "SIZES", {"adjoint_2d": 16, "adjoint_3d": 8, "dip": (8,), "dip_quick": (8,),
                                      "sampler": 8, "net": (4, 2)})
    return gc


def test_gpu_parts_code_runs_on_cpu_stand_in(tmp_path, cpu_stand_in):
    gc = cpu_stand_in
    gc.main(["--out", str(tmp_path), "--quick", "--only", "adjoint,dip_timing,sampler_step"])
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    for name, p in parts.items():
        # the limits are for astra-cuda; on the stand-in only the code path is checked
        assert "traceback" not in p, (name, p.get("traceback"))
    geoms = parts["adjoint"]["results"]["geometries"]
    assert len(geoms) == 6 and all(r["dot"] < 1e-5 for r in geoms.values())  # cpu-cone: an exact CSR pair
    assert parts["dip_timing"]["results"]["sizes"]["8^3"]["iter_ms"] > 0
    assert parts["sampler_step"]["results"]["sgd"]["steps_timed"] == 5
    assert parts["sampler_step"]["results"]["cg"]["steps_timed"] == 5
    assert "| dip_timing | ok |" in (tmp_path / "gpu_check.md").read_text()


def test_diamond_part_on_cpu_stand_in(tmp_path, cpu_stand_in, shared_data, monkeypatch):
    gc = cpu_stand_in
    monkeypatch.setattr(gc, "diamond_overrides", lambda quick: [
        "data.angles=12", "data.bin=4", "dip.iterations=5", "dip.network.scales=2", "dip.network.channels=4",
        "linearise.diag_probes=2", "posterior.em_rounds=0", "sampler.method=cg", "sampler.n_samples=2",
        "sampler.cg_max_iter=5", "output.figures=false", "output.report=false"])
    assert gc.main(["--out", str(tmp_path), "--only", "pipeline_diamond", "--data", str(shared_data)]) == 0
    r = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["pipeline_diamond"]["results"]
    assert set(r["stage_s"]) >= {"dip", "sampler"} and len(r["recon_shape"]) == 3
    assert "Diamond 128³ per-stage seconds" in (tmp_path / "gpu_check.md").read_text()


def test_diamond_part_skips_without_data(tmp_path, cpu_stand_in, monkeypatch):
    gc = cpu_stand_in
    monkeypatch.setenv("DIPUQ_CACHE", str(tmp_path / "empty-cache"))
    assert gc.main(["--out", str(tmp_path), "--only", "pipeline_diamond", "--data", str(tmp_path / "none")]) == 0
    p = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["pipeline_diamond"]
    assert p["status"] == "skipped" and "not found in the mirror" in p["reason"]
