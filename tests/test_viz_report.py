"""Figures, the HTML report (without a browser) and the run-directory utilities."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest

from dipuq.show import prepare, viz
from dipuq.show.report import render_report, write_report
from dipuq._io import atomic_path, atomic_save_npy, atomic_save_tiff, atomic_write_json, atomic_write_text
from dipuq.run.rundir import RunDir


def _volumes(shape=(12, 14, 16), seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.random(shape).astype(np.float32)
    std = (0.05 + 0.1 * rng.random(shape)).astype(np.float32)
    recon = (ref + std * rng.standard_normal(shape)).astype(np.float32)
    return recon, std, ref


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return w, h


def test_derived_maps_and_scales():
    recon, std, ref = _volumes()
    maps = prepare.derived_maps(recon, std, ref)
    assert set(maps) == {"recon", "reference", "std", "abs_error", "zscore"}
    np.testing.assert_allclose(maps["zscore"], (recon - ref) / std, rtol=1e-6)  # float32 division
    np.testing.assert_array_equal(maps["abs_error"], np.abs(recon - ref))
    s = prepare.display_scales(maps, zscore_limit=2.5)
    assert s["recon"] == s["reference"]  # one grey scale for reconstruction and reference
    assert s["std"][0] == s["abs_error"][0] == 0  # magnitudes start at 0
    assert s["std"][1] == pytest.approx(np.percentile(std, 99.5))
    assert s["zscore"] == (-2.5, 2.5)
    assert set(prepare.derived_maps(recon, std)) == {"recon", "std"}
    with pytest.raises(ValueError, match="std shape"):
        prepare.derived_maps(recon, std[:-1])


def test_coverage_curve_of_calibrated_gaussian():
    rng = np.random.default_rng(1)
    std = rng.uniform(0.1, 2.0, 200_000)
    err = std * rng.standard_normal(std.size)
    nominal, empirical = prepare.coverage_curve(err, std)
    # binomial sd of a coverage fraction at n = 2e5 is <= 0.0012; 0.005 is ~4 sd
    np.testing.assert_allclose(empirical, nominal, atol=0.005)
    _, over = prepare.coverage_curve(2 * err, std)  # errors twice the error bars: over-confident
    assert (over < nominal - 0.05)[5:].all()


def test_slice_indices():
    assert prepare.slice_indices(5, 32) == [0, 1, 2, 3, 4]
    idx = prepare.slice_indices(100, 9)
    assert len(idx) == 9 and 50 in idx and idx[0] == 0 and idx[-1] == 99 and idx == sorted(set(idx))
    for n in range(1, 60):
        got = prepare.slice_indices(n, 8)
        assert len(got) == min(n, 8) and n // 2 in got and all(0 <= i < n for i in got)


def test_figures_render(tmp_path):
    recon, std, ref = _volumes()
    maps = prepare.derived_maps(recon, std, ref)
    figs = {
        "ortho3d": viz.orthoslices(maps, title="t"),
        "ortho2d": viz.orthoslices(prepare.derived_maps(recon[0], std[0], ref[0])),
        "noref": viz.orthoslices({"recon": recon, "std": std}),
        "one_axis": viz.orthoslices(maps, axes=("y",), indices={"y": 3}),
        "reliability": viz.reliability_diagram(*prepare.coverage_curve(recon - ref, std)),
        "hexbin": viz.std_error_hexbin(std, np.abs(recon - ref), spearman=0.3),
        "loss": viz.loss_curve(np.arange(50), np.exp(-np.arange(50) / 10) + 0.01, best_iteration=40,
                               noise_level=0.01, psnr=([0, 10, 20], [10.0, 15.0, 17.0])),
        "curves": viz.curves_figure({"a": ([1, 2, 3], [1.0, 0.1, 0.01])}, xlabel="x", ylabel="y", title="t"),
        "em": viz.em_trace([1.0, 0.5, 0.4], gamma=[10.0, 12.0]),
    }
    for name, fig in figs.items():
        path = viz.save_figure(fig, tmp_path / f"{name}.png", dpi=60)
        w, h = _png_size(path.read_bytes())
        assert w > 100 and h > 100, name
    # 3D grid: 3 views x 5 quantities; 2D: one row; the one-axis figure: one row
    assert len(figs["ortho3d"].axes) == 3 * 5 + 5 and len(figs["ortho2d"].axes) == 5 + 5
    assert len(figs["noref"].axes) == 3 * 2 + 2 and len(figs["one_axis"].axes) == 5 + 5
    titles = [ax.get_title() for ax in figs["ortho3d"].axes]
    assert "Posterior std σ" in titles and "z-score (x̂ − x_ref)/σ" in titles
    zs = [im for ax in figs["ortho3d"].axes for im in ax.get_images() if im.get_cmap().name == "RdBu_r"]
    assert zs and all(im.get_clim() == (-3.0, 3.0) for im in zs)


def test_array_png_and_colorbar():
    img = np.linspace(0, 1, 12 * 7).reshape(12, 7)
    png = viz.array_png(img, "gray", 0, 1)
    assert _png_size(png) == (7, 12)  # pixel for pixel
    import matplotlib.image

    rgba = matplotlib.image.imread(io.BytesIO(png))
    assert rgba[0, 0, :3].max() < 0.01 and rgba[-1, -1, :3].min() > 0.99  # black -> white
    assert _png_size(viz.colorbar_png("magma", 0, 2, "σ"))[0] > 100


def test_report_is_self_contained_and_bounded(tmp_path):
    recon, std, ref = _volumes((40, 20, 30))
    html = render_report(recon, std, reference=ref, metrics={"psnr": 30.0, "coverage_90": 0.9, "nested": {"a": 1}},
                         figures={"Calibration": viz.colorbar_png("gray", 0, 1)}, config_text="[dip]\niterations = 5",
                         provenance={"seed": 3}, title="T <script>", n_slices=6)
    assert "<script>alert" not in html and "T &lt;script&gt;" in html  # escaped
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    data = json.loads(re.search(r'<script type="application/json" id="frames">(.*?)</script>', html, re.S).group(1))
    assert set(data) == {"z", "y", "x"}
    for axis, n in zip("zyx", (40, 20, 30)):
        f = data[axis]
        assert f["size"] == n and len(f["indices"]) == 6 and n // 2 in f["indices"]
        assert set(f["images"]) == {"recon", "reference", "std", "abs_error", "zscore"}
        png = base64.b64decode(f["images"]["std"][0])
        assert _png_size(png) == {"z": (30, 20), "y": (30, 40), "x": (20, 40)}[axis]
    for key in ("slider-z", "slider-y", "slider-x", "PSNR [dB]", "coverage 90 %", "nested.a", "Calibration",
                "iterations = 5", "&quot;seed&quot;: 3"):
        assert key in html, key
    # 2D: a single viewer, and no error panels without a reference
    html2 = render_report(recon[0], std[0])
    data2 = json.loads(re.search(r'id="frames">(.*?)</script>', html2, re.S).group(1))
    assert list(data2) == ["z"] and set(data2["z"]["images"]) == {"recon", "std"}
    assert "No reference volume" in html2
    # large slices are subsampled for the viewer
    big = np.zeros((600, 300), np.float32)
    data3 = json.loads(re.search(r'id="frames">(.*?)</script>', render_report(big, big + 1, max_px=256), re.S).group(1))
    assert _png_size(base64.b64decode(data3["z"]["images"]["recon"][0])) == (100, 200)  # step ceil(600/256) = 3
    path = write_report(tmp_path / "r.html", recon, std, n_slices=4)
    assert path.stat().st_size < 400_000


def test_atomic_writes_never_leave_partial_files(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')  # a writer dies half-way
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic_write_text(target, "x")
    assert target.read_text() == "x"
    atomic_save_npy(tmp_path / "v.npy", np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), np.arange(6.0).reshape(2, 3))
    import tifffile

    vol = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    atomic_save_tiff(tmp_path / "v.tif", vol, voxel_size=0.5)
    with tifffile.TiffFile(tmp_path / "v.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == 0.5
        np.testing.assert_array_equal(tif.asarray(), vol)


def test_rundir_markers(tmp_path):
    run = RunDir(tmp_path / "run", ("a", "b", "c"))
    run.create()
    assert run.stage_dir("b").name == "02_b"
    run.stage_path("a", "out.txt").write_text("1")
    run.mark_done("a", "k1", seconds=1.5)
    run.mark_done("b", "k1")
    assert run.is_done("a", "k1") and not run.is_done("a", "k2") and run.marker("a")["seconds"] == 1.5
    assert run.finished_stages() == ["a", "b"]
    (run.stage_dir("b") / "done.json").write_text('{"stage": "b", "ke')  # a corrupt marker is not trusted
    assert not run.is_done("b", "k1")
    run.invalidate("b")
    assert run.finished_stages() == ["a"] and not run.stage_dir("b").exists()
    (run.root / "recon.npy").write_text("x")
    (run.root / "mine.txt").write_text("keep")
    run.clear()
    assert sorted(p.name for p in run.root.iterdir()) == ["mine.txt"]


def test_saved_files_get_umask_permissions_not_private(tmp_path):
    """Scans, checkpoints and maps are shared with colleagues: no mkstemp 0600 files."""
    import os

    import torch

    from dipuq._io import save_torch
    from dipuq.maps.uncertainty import UncertaintyMaps

    old = os.umask(0o022)
    try:
        save_torch({"a": torch.zeros(2)}, tmp_path / "c.pt")
        UncertaintyMaps(mean=np.zeros((2, 2)), std=np.ones((2, 2)), n_samples=3).save(tmp_path / "maps.npz")
        atomic_write_json(tmp_path / "m.json", {"v": 1})
    finally:
        os.umask(old)
    for name in ("c.pt", "maps.npz", "m.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "m.json", "maps.npz"]
