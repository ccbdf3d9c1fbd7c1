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
