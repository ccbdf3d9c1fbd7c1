import numpy as np
import pytest

from dipuq.errors import DipuqError
from dipuq.geometry import Geometry


def test_degrees_at_the_edge_and_radians_inside():
    g = Geometry.parallel2d([0, 90, 180], (8, 8), units="deg")
    assert np.allclose(g.angles, [0, np.pi / 2, np.pi])


def test_vectors_follow_astra_formulas():
    th = 0.3
    g = Geometry.cone3d([th], (8, 8, 8), (4, 6), 100.0, 50.0, det_spacing=(2.0, 1.5), cor_offset=2.0)
    r, d, u, v = np.split(g.to_vectors()[0], 4)
    assert np.allclose(r, 100 * np.array([np.sin(th), -np.cos(th), 0]))
    assert np.allclose(u, 1.5 * np.array([np.cos(th), np.sin(th), 0]))
    assert np.allclose(v, [0, 0, 2.0])
    assert np.allclose(d, 50 * np.array([-np.sin(th), np.cos(th), 0]) - 2.0 * u)


def test_round_trip_and_subset():
    g = Geometry.fan2d(np.linspace(0, 2 * np.pi, 10, endpoint=False), (16, 16), 24, 80.0, 40.0)
    assert Geometry.from_dict(g.to_dict()) == g
    s = g.subset(slice(None, None, 2))
    assert s.n_angles == 5 and np.allclose(s.angles, g.angles[::2])
    vg = Geometry.from_vectors("cone", np.zeros((3, 12)) + 1, (4, 4, 4), (4, 4))
    assert vg.is_vector and vg.proj_shape == (3, 4, 4) and Geometry.from_dict(vg.to_dict()) == vg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beam="helical", angles=[0], vol_shape=(4, 4), det_shape=(4,)), "unknown geometry"),
        (dict(beam="fan", angles=[0], vol_shape=(4, 4, 4), det_shape=(4, 4)), "fan beam is 2D"),
        (dict(beam="parallel", angles=[0], vol_shape=(4, 4), det_shape=(4, 4)), "needs a 1D detector"),
        (dict(beam="parallel", angles=[np.nan], vol_shape=(4, 4), det_shape=(4,)), "NaN"),
        (dict(beam="cone", angles=[0], vol_shape=(4, 4, 4), det_shape=(4, 4)), "source_origin"),
        (dict(beam="cone", angles=[0], vol_shape=(40, 40, 40), det_shape=(4, 4), source_origin=10,
              origin_detector=10), "inside the volume"),
    ],
)
def test_bad_geometry_is_a_clear_error(kwargs, message):
    with pytest.raises(DipuqError, match=message):
        Geometry(**kwargs)


def test_cor_offset_moves_the_axis_projection():
    """The rotation axis (origin) projects onto column (cols-1)/2 + cor_offset."""
    for g in (Geometry.parallel2d([0.4], (8, 8), 11, cor_offset=1.5),
              Geometry.fan2d([0.4], (8, 8), 11, 50.0, 30.0, cor_offset=1.5)):
        r, d, u = np.split(g.to_vectors()[0], 3)
        # the ray through the origin meets the detector line at d + t u; parallel: along r, fan: from r
        direction = r if g.beam == "parallel" else -r
        A = np.stack([u, -direction], 1)
        t, _ = np.linalg.solve(A, -d)
        assert np.isclose(t + (11 - 1) / 2, (11 - 1) / 2 + 1.5)


def test_missing_wedge_of_limited_angle_scans_only():
    """Full scans (sparse, 360°, fan/cone with their fan angle) have no missing wedge; a 100° parallel
    arc misses 80° less one angular step, a ±45° tilt series 90°, a 120° cone scan 120° + fan less."""
    import math

    G = Geometry.parallel2d
    assert G(np.linspace(0, np.pi, 20, endpoint=False), (64, 64)).missing_wedge_deg() == 0
    full360 = np.arange(625) * 2 * np.pi / 625
    assert G(full360[np.round(np.linspace(0, 624, 40)).astype(int)], (64, 64)).missing_wedge_deg() == 0
    assert Geometry.fan2d(np.linspace(0, 2 * np.pi, 30, endpoint=False), (64, 64), 96, 256, 128).missing_wedge_deg() == 0
    lim = G(np.radians(np.linspace(0, 100, 30)), (64, 64)).missing_wedge_deg()
    assert lim == pytest.approx(80 - 100 / 29, abs=1e-6)
    tilt = Geometry.parallel3d(np.radians(np.linspace(-45, 45, 61)), (16, 16, 16), (16, 16))
    assert tilt.missing_wedge_deg() == pytest.approx(90 - 1.5, abs=1e-6)
    cone = Geometry.cone3d(np.radians(np.linspace(0, 120, 21)), (16, 16, 16), (20, 24), 64, 32)
    half_fan = math.degrees(math.atan2(12, 96))
    assert cone.missing_wedge_deg() == pytest.approx(60 - 2 * half_fan, abs=1e-6)
