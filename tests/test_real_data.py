"""Real measured data (the mirror in ../shared/data): loading, CoR, FBP from full and sparse angles.

Correlations are Pearson correlations of whole reconstructed images. Thresholds were set from
measurements on this data (astra-cpu backend, dipuq's FBP, ramp filter), leaving margin for
other backends; each assertion says what was measured.
"""

import numpy as np
import pytest
import torch

from dipuq.data import bin, crop, estimate_cor, fetch, load_scan, open_dataset, subsample_angles
from dipuq.data.preprocess import axis_column, cor_offset_for_axis

recon = pytest.importorskip("dipuq.operators.recon")
from dipuq.operators import RayTransform  # noqa: E402


def corr(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def fbp(scan) -> np.ndarray:
    A = RayTransform(scan.geometry, backend="auto")
    return recon.fbp(A, torch.from_numpy(scan.projections)).numpy()


def shifted_axis(scan, pixels: float):
    """The same scan with the rotation axis moved by ``pixels`` detector columns (a wrong CoR)."""
    g = scan.geometry
    return scan.replace(geometry=g.replace(cor_offset=cor_offset_for_axis(axis_column(g) + pixels, g)))


@pytest.fixture(scope="module")
def tooth(shared_data):
    return open_dataset("tooth", mirror=shared_data)


@pytest.fixture(scope="module")
def diamond(shared_data):
    return load_scan(shared_data / "savu_24737", angle_start=10, cor="auto")


def test_tooth_loads_as_2d_parallel(tooth):
    g = tooth.geometry
    assert g.beam == "parallel" and g.ndim == 2 and tooth.projections.shape == (181, 640)
    assert np.degrees(g.angles[[0, -1]]) == pytest.approx([0.0, 179.0055], abs=1e-3)
    assert tooth.has_raw and tooth.counts.shape == (181, 640)
    # line integrals of a small tooth in air: background ≈ 0, tooth up to ≈ 2 (measured 2.1)
    assert np.median(tooth.projections) < 0.2 and 1.5 < tooth.projections.max() < 3.0


def test_cor_estimates_match_provenance(tooth, diamond):
    """PROVENANCE: tooth axis ≈ pixel 296 of 640, Diamond ≈ 86.25 of 160 (pixel-edge convention).

    estimate_cor uses pixel centres at integers, so those read 295.5 and 85.75; measured 295.575
    (0° vs 179°: the closest pair to 180° apart) and 85.825 (-88.2° vs 91.8°). The same value
    from both rows of the tooth (295.575 / 295.6) shows it is not noise.
    """
    assert estimate_cor(tooth.projections, tooth.angles) == pytest.approx(295.5, abs=0.5)
    assert axis_column(tooth.geometry) == pytest.approx(295.575, abs=1e-6)  # the registry's value
    assert estimate_cor(diamond.projections, diamond.angles) == pytest.approx(85.75, abs=0.5)
    assert axis_column(diamond.geometry) == pytest.approx(estimate_cor(diamond.projections, diamond.angles))


def test_tooth_fbp_full_and_sparse_agree(tooth):
    """FBP from 181 and from 30 angles (4× binned: 160 px, ~1 s) both show the tooth.

    Measured: corr(full, 30 angles) = 0.928 (20 angles: 0.866); with the axis at the detector
    centre (24 px off, what one gets by ignoring the CoR) 0.525 (6 px off: 0.836); against white
    noise 0.006. Threshold 0.85 sits between the sparse-angle result and a broken geometry.
    """
    scan = bin(tooth, 4)
    assert scan.projections.shape == (181, 160) and scan.geometry.voxel_size == 4
    full = fbp(scan)
    sparse = fbp(subsample_angles(scan, 30))
    wrong = fbp(shifted_axis(subsample_angles(scan, 30), 24 / 4))
    noise = np.random.default_rng(0).standard_normal(full.shape)
    c_sparse, c_wrong, c_noise = corr(full, sparse), corr(full, wrong), corr(full, noise)
    assert c_sparse > 0.85, c_sparse
    assert c_wrong < 0.7, c_wrong
    assert c_sparse - c_wrong > 0.25  # measured 0.40
    assert abs(c_noise) < 0.05
    # the tooth is attenuating material in air: FBP values concentrate near 0 with a bright object
    assert np.median(full) < 0.1 * full.max()


def test_diamond_loads_from_tiffs(diamond, shared_data):
    g = diamond.geometry
    assert g.beam == "parallel" and g.ndim == 3 and diamond.projections.shape == (91, 135, 160)
    assert np.degrees(g.angles[[0, 1, -1]]) == pytest.approx([-88.2, -86.2, 91.8], abs=1e-3)
    assert g.vol_shape == (135, 160, 160)
    # pixel (0, 0) is dead (flat = dark = 0): interpolated, so all line integrals are finite and ≤ 6.9
    assert np.isfinite(diamond.projections).all() and diamond.projections.max() < 6.91
    reg = open_dataset("diamond-24737", mirror=shared_data)
    np.testing.assert_array_equal(reg.projections, diamond.projections)


def test_diamond_slicewise_fbp_full_and_sparse(diamond):
    """16 axial slices (rows 72–87, the dense rod in a cylinder), 3D parallel FBP slice by slice.

    Measured over these 16 slices: corr(91 angles, 23 angles) 0.877–0.891; with the axis at the
    detector centre (6.3 px off) 0.337–0.444. Thresholds 0.8 and 0.6 split the two with margin.
    """
    sub = crop(diamond, rows=(72, 88))
    assert sub.geometry.vol_shape == (16, 160, 160)
    full = fbp(sub)
    sparse = fbp(subsample_angles(sub, 23))
    wrong = fbp(shifted_axis(subsample_angles(sub, 23), -6.3))
    c_sparse = [corr(full[k], sparse[k]) for k in (0, 8, 15)]
    c_wrong = [corr(full[k], wrong[k]) for k in (0, 8, 15)]
    assert min(c_sparse) > 0.8, c_sparse
    assert max(c_wrong) < 0.6, c_wrong
    # 2D slice of the 3D scan = the same slice of the 3D reconstruction
    one = fbp(sub.slice(8))
    np.testing.assert_allclose(one, full[8], atol=1e-5 * np.abs(full).max())  # measured 2e-7 (float32)


def test_registry_fetch_uses_the_mirror(shared_data):
    assert fetch("tooth", mirror=shared_data) == shared_data / "tomopy_tooth.h5"
    assert fetch("diamond-24737", mirror=shared_data) == shared_data / "savu_24737"


def test_psiwood2d_experiment_scan_builds_from_the_mirror(shared_data, monkeypatch):
    """The psiwood2d experiment's scan: 40 of the 625 angles over 360°, 577 columns binned by 4
    to 144, a 144² volume, and a reference = FBP of all 625 angles that the sparse FBP resembles
    (correlation 0.89 measured; the 40-angle FBP carries streaks and the rings of both)."""
    from dipuq.experiments.scans import build_scan
    from dipuq.experiments import load_experiment

    monkeypatch.setenv("DIPUQ_DATA_MIRROR", str(shared_data))
    spec = load_experiment("psiwood2d")
    case = next(c for c in spec.cases if c.name == "a40")
    scan, _ = build_scan(spec, case, seed=0)
    assert scan.projections.shape == (40, 144)
    assert scan.reference.shape == (144, 144)
    assert np.allclose(np.diff(np.degrees(scan.geometry.angles)), 360 / 40, atol=0.6)  # 625 is not a multiple of 40
    assert np.quantile(scan.reference, 0.999) == pytest.approx(1.0, rel=1e-3)  # unit_scale
    assert corr(fbp(scan), scan.reference) > 0.7
