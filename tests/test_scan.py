"""Scan container: NPZ round trips, validation errors, 2D slices of 3D scans."""

import json
from pathlib import Path

import numpy as np
import pytest

from dipuq.data import Scan, load_scan
from dipuq.errors import DataError
from dipuq.geometry import Geometry

RNG = np.random.default_rng(0)


def _g2(n_angles=6, vol=(8, 8), det=13, **kw):
    return Geometry.parallel2d(np.linspace(0, np.pi, n_angles, endpoint=False), vol, det, **kw)


def _g3(n_angles=5, vol=(4, 8, 8), det=(4, 13), **kw):
    return Geometry.parallel3d(np.linspace(0, np.pi, n_angles, endpoint=False), vol, det, **kw)


def _scan(g, **kw):
    return Scan(RNG.random(g.proj_shape).astype(np.float32), g, **kw)


def _raw(g):
    flat = np.full(g.det_shape, 1000.0, np.float32)
    dark = np.full(g.det_shape, 10.0, np.float32)
    counts = (dark + (flat - dark) * RNG.uniform(0.1, 0.9, g.proj_shape)).astype(np.float32)
    return counts, flat, dark


# -- round trips ------------------------------------------------------------------------------
def test_npz_round_trip_2d(tmp_path):
    g = _g2(cor_offset=1.5, voxel_size=0.5, det_spacing=0.7)
    ref = RNG.random(g.vol_shape)
    s = _scan(g, reference=ref, noise_std=0.01, name="toy", meta={"a": [1, 2], "b": "x"})
    path = s.save(tmp_path / "toy.npz")
    t = Scan.load(path)
    np.testing.assert_array_equal(t.projections, s.projections)
    np.testing.assert_array_equal(t.reference, s.reference)
    assert t.geometry == g and t.noise_std == 0.01 and t.name == "toy" and t.meta == s.meta
    assert [p.name for p in tmp_path.iterdir()] == ["toy.npz"]  # atomic write leaves no temp file


def test_npz_round_trip_cone_and_3d(tmp_path):
    g = Geometry.cone3d(np.linspace(0, 2 * np.pi, 7, endpoint=False), (4, 6, 6), (5, 9), 40.0, 20.0,
                        det_spacing=(1.5, 1.25))
    s = _scan(g)
    t = load_scan(s.save(tmp_path / "cone.npz"))
    assert t.geometry == g
    np.testing.assert_array_equal(t.projections, s.projections)
    g3 = _g3()
    t3 = load_scan(_scan(g3).save(tmp_path / "par3.npz"))
    assert t3.geometry == g3 and t3.projections.shape == (5, 4, 13)


def test_npz_round_trip_vector_geometry(tmp_path):
    g = Geometry.from_vectors("parallel", _g2().to_vectors(), (8, 8), (13,))
    t = Scan.load(_scan(g).save(tmp_path / "vec.npz"))
    assert t.geometry == g


def test_raw_counts_round_trip_recomputes_line_integrals(tmp_path):
    g = _g2()
    counts, flat, dark = _raw(g)
    from dipuq.data import line_integrals

    s = Scan(line_integrals(counts, flat, dark), g, counts=counts, flat=flat, dark=dark)
    t = Scan.load(s.save(tmp_path / "raw.npz"))
    np.testing.assert_array_equal(t.counts, counts)
    np.testing.assert_array_equal(t.projections, s.projections)  # same float64 maths, same float32 result


def test_cli_format_minimal_keys_and_degrees(tmp_path):
    """A hand-written file with only the required keys, angles in degrees, raw stacks of flats."""
    g = _g2()
    counts, flat, dark = _raw(g)
    np.savez(tmp_path / "hand.npz", projections=counts, angles_deg=np.degrees(g.angles), geometry="parallel",
             volume_shape=[8, 8], flat=np.stack([flat, flat]), dark=dark[None], cor_offset=0.5)
    s = load_scan(tmp_path / "hand.npz")
    np.testing.assert_allclose(s.angles, g.angles, atol=1e-12)
    np.testing.assert_allclose(s.projections, -np.log((counts - 10) / 990), rtol=1e-5)
    assert s.geometry.cor_offset == 0.5 and s.flat.shape == (13,)


# -- validation ------------------------------------------------------------------------------
def _bad_npz(tmp_path, **changes):
    g = _g2()
    d = dict(projections=np.zeros(g.proj_shape, np.float32), angles=g.angles, geometry="parallel",
             volume_shape=[8, 8])
    d.update(changes)
    d = {k: v for k, v in d.items() if v is not None}
    np.savez(tmp_path / "bad.npz", **d)
    return tmp_path / "bad.npz"


@pytest.mark.parametrize("changes, message", [
    (dict(projections=np.zeros((6, 13, 2))), "dimensions"),
    (dict(angles=np.zeros(5)), "angle count mismatch"),
    (dict(geometry="helical"), "unknown geometry"),
    (dict(volume_shape=None), "missing key 'volume_shape'"),
    (dict(angles=None), "missing key 'angles'"),
    (dict(angles_deg=np.zeros(6)), "either 'angles'"),
    (dict(projections=np.full((6, 13), np.nan)), "non-finite"),
    (dict(projections=np.full((6, 13), np.inf)), "non-finite"),
    (dict(reference=np.zeros((8, 9))), "reference volume shape"),
    (dict(flat=np.ones(13)), "need both 'flat' and 'dark'"),
    (dict(flat=np.ones(12), dark=np.zeros(12)), "flat field shape"),
    (dict(flat=np.ones(13), dark=np.full(13, 2.0)), "flat field must exceed the dark field"),
    (dict(flat=np.full(13, 5.0), dark=np.zeros(13), projections=np.zeros((6, 13))), "counts must be positive"),
    (dict(noise_std=-1.0), "noise_std must be finite and > 0"),
    (dict(foo=1), "unknown keys foo"),
    (dict(geometry="fan"), "fan beam needs source_origin"),
])
def test_bad_npz_gives_one_line_data_error(tmp_path, changes, message):
    with pytest.raises(DataError, match=message) as err:
        Scan.load(_bad_npz(tmp_path, **changes))
    assert "\n" not in str(err.value)


def test_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(DataError, match="not a readable .npz"):
        Scan.load(tmp_path / "x.npz")
    with pytest.raises(DataError, match="end in .npz"):
        _scan(_g2()).save(tmp_path / "x.txt")


@pytest.mark.parametrize("field, value, message", [
    ("projections", np.zeros((6, 12)), "projection shape .* does not match"),
    ("projections", np.zeros((7, 13)), "angle count mismatch: projections have 7 angles, geometry has 6"),
    ("reference", np.zeros((8, 8, 1)), "reference volume shape"),
    ("counts", np.ones((6, 13)), "raw data need counts, flat and dark together"),
    ("geometry", "parallel", "must be a dipuq.geometry.Geometry"),
    ("projections", np.array([["a"]]), "must be numeric"),
])
def test_constructor_validates(field, value, message):
    g = _g2()
    kw = dict(projections=np.zeros(g.proj_shape), geometry=g)
    kw[field] = value
    with pytest.raises(DataError, match=message):
        Scan(**kw)


def test_raw_validation_tolerates_a_few_dead_pixels_only():
    g = _g2(n_angles=10, det=200)
    counts, flat, dark = _raw(g)
    flat[0] = dark[0]  # one dead pixel of 200 (0.5 %): like the Diamond scan's pixel (0, 0)
    counts[:, 0] = 0
    Scan(np.zeros(g.proj_shape), g, counts=counts, flat=flat, dark=dark)
    flat[:4] = dark[:4]  # 2 %: broken data
    with pytest.raises(DataError, match=r"flat <= dark at 2\.0% of pixels"):
        Scan(np.zeros(g.proj_shape), g, counts=counts, flat=flat, dark=dark)
    with pytest.raises(DataError, match="negative"):
        Scan(np.zeros(g.proj_shape), g, counts=-counts, flat=flat, dark=dark)


# -- slices --------------------------------------------------------------------------------------
def test_slice_of_3d_parallel_scan():
    g = _g3(cor_offset=0.75)
    ref = RNG.random(g.vol_shape).astype(np.float32)
    counts, flat, dark = _raw(g)
    s = Scan(RNG.random(g.proj_shape), g, reference=ref, counts=counts, flat=flat, dark=dark, name="v")
    t = s.slice(2)
    assert t.geometry == Geometry.parallel2d(g.angles, (8, 8), 13, cor_offset=0.75)
    np.testing.assert_array_equal(t.projections, s.projections[:, 2])
    np.testing.assert_array_equal(t.reference, ref[2])  # rows and slices aligned: row 2 is slice 2
    np.testing.assert_array_equal(t.flat, flat[2])
    assert s.slice(-1).meta["slice_row"] == 3
    # 6 slices for 4 rows: row r is slice r + 1
    g6 = _g3(vol=(6, 8, 8))
    assert np.array_equal(Scan(np.zeros(g6.proj_shape), g6, reference=ref.repeat(2, 0)[:6]).slice(0).reference,
                          ref.repeat(2, 0)[1])


def test_slice_errors():
    with pytest.raises(DataError, match="outside the detector's 4 rows"):
        _scan(_g3()).slice(4)
    with pytest.raises(DataError, match="3D parallel-beam"):
        _scan(_g2()).slice(0)
    cone = Geometry.cone3d([0.0, 1.0], (4, 6, 6), (5, 9), 40.0, 20.0)
    with pytest.raises(DataError, match="3D parallel-beam"):
        _scan(cone).slice(0)


def test_meta_must_be_json(tmp_path):
    s = _scan(_g2(), meta={"arr": np.arange(3), "path": Path("/x")})
    t = Scan.load(s.save(tmp_path / "m.npz"))
    assert t.meta == json.loads(json.dumps({"arr": [0, 1, 2], "path": "/x"}))
