"""Ray transforms on CPU: dot tests, conventions, ASTRA/ODL cross-checks, torch.func, recon, errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dipuq.errors import DipuqError, GPUUnavailableError
from dipuq.geometry import Geometry
from dipuq.operators import (RayTransform, _astra, available_backends, cgls, cuda_available, fbp, fdk,
                             sirt, analytic)
from dipuq.operators.base import LinearOperator, MatrixOperator
from dipuq.testing import check_adjoint, check_jvp_vjp, ellipsoid

CPU_BACKENDS = ["astra-cpu", "cpu-cone"]
no_gpu = pytest.mark.skipif(cuda_available(), reason="checks the CPU-only behaviour")


def _angles(n, full=False):
    return np.linspace(0, (2 if full else 1) * np.pi, n, endpoint=False)


def _vector2d():
    """A 2D fan vector geometry that no circular constructor makes: wobbling source, tilted detector."""
    th = _angles(12, full=True)
    s, c = np.sin(th), np.cos(th)
    src = np.stack([45 * s + 1.5 * c, -45 * c + 0.5], 1)
    det = np.stack([-25 * s, 25 * c], 1)
    u = np.stack([np.cos(th + 0.05), np.sin(th + 0.05)], 1) * 1.1
    return Geometry.from_vectors("fan", np.concatenate([src, det, u], 1), (24, 24), (40,))


GEOMS_2D = {
    "parallel": lambda: Geometry.parallel2d(_angles(15), (24, 24)),
    "parallel-cor-vs": lambda: Geometry.parallel2d(_angles(15), (24, 24), det_count=30, voxel_size=0.5,
                                                   det_spacing=0.6, cor_offset=2.5),
    "fan": lambda: Geometry.fan2d(_angles(15, True), (24, 24), 40, source_origin=50, origin_detector=30),
    "fan-cor": lambda: Geometry.fan2d(_angles(15, True), (24, 24), 40, source_origin=50, origin_detector=30,
                                      cor_offset=-1.5, det_spacing=1.3),
    "fan-vector": _vector2d,
}


# ------------------------------------------------------------------------------------------
# dot tests
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(GEOMS_2D))
def test_dot_2d(name, backend):
    A = RayTransform(GEOMS_2D[name](), backend=backend)
    # the sparse pair is an exact transpose: measured ≤ 2e-8 (float32 summation rounding); 1e-5 is the spec
    assert check_adjoint(A, generator=torch.Generator().manual_seed(1)) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dot_3d_parallel(backend):
    g = Geometry.parallel3d(_angles(10), (8, 12, 12), cor_offset=1.0)
    A = RayTransform(g, backend=backend)
    assert A.backend == backend
    assert check_adjoint(A) < 1e-5  # measured ~1e-9


def test_dot_cone():
    g = Geometry.cone3d(_angles(8, True), (10, 12, 12), (12, 18), source_origin=40, origin_detector=20, cor_offset=0.7)
    A = RayTransform(g)
    assert A.backend == ("astra-cuda" if cuda_available() else "cpu-cone")
    if A.backend == "cpu-cone":
        assert check_adjoint(A) < 1e-5  # measured ~2e-9


def test_check_adjoint_can_fail():
    M = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))

    class Wrong(MatrixOperator):
        def _adjoint(self, y):  # a wrong "adjoint": 1.1 Mᵀ
            return 1.1 * super()._adjoint(y)

    assert check_adjoint(MatrixOperator(M)) < 1e-6  # float32 rounding on a 7×5 matrix
    assert check_adjoint(Wrong(M)) > 1e-3  # a 10 % mismatch leaves ≥ 1e-3 at any Gaussian draw here


# ------------------------------------------------------------------------------------------
# conventions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("beam", ["parallel", "fan"])
def test_single_pixel_orientation(beam, backend):
    """A pixel at y = +5 (row index c+5) projects to column c+5 at θ = π/2 (u = (0, 1)).

    This pins the y flip of the ASTRA 2D bridge: without it the peak is at column c-5.
    """
    ang = np.array([0.0, np.pi / 2])
    if beam == "parallel":
        g = Geometry.parallel2d(ang, (17, 17), det_count=25)
        shift = 5
    else:  # at θ = π/2 the source sits at x = +40; a point at y = +5, x = 0 is magnified 60/40
        g = Geometry.fan2d(ang, (17, 17), 25, source_origin=40, origin_detector=20)
        shift = round(5 * 60 / 40)
    x = torch.zeros(17, 17)
    x[8 + 5, 8] = 1.0
    y = RayTransform(g, backend=backend)(x)
    assert int(y[0].argmax()) == 12  # θ = 0: the point is on the central ray
    assert int(y[1].argmax()) == 12 + shift


@pytest.mark.parametrize("name", ["parallel-cor-vs", "fan-cor"])
def test_astra_cpu_vs_cpu_cone_2d(name):
    g = GEOMS_2D[name]()
    ph = torch.from_numpy(ellipsoid(g.vol_shape, (1.5 * g.voxel_size, -2 * g.voxel_size),
                                    (7 * g.voxel_size, 5 * g.voxel_size), voxel_size=g.voxel_size))
    ya = RayTransform(g, backend="astra-cpu")(ph)
    yc = RayTransform(g, backend="cpu-cone")(ph)
    rel = float((ya - yc).norm() / yc.norm())
    # different kernels (ASTRA linear/line_fanflat vs trilinear): measured 0.25 % (parallel), 1.8 % (fan)
    assert rel < (0.01 if g.beam == "parallel" else 0.03), rel


# ------------------------------------------------------------------------------------------
# astra-cpu sparse path = direct ASTRA calls
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["parallel-cor-vs", "fan-cor", "fan-vector"])
def test_sparse_equals_direct_astra(name):
    g = GEOMS_2D[name]()
    A = RayTransform(g, backend="astra-cpu")
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(g.vol_shape, generator=gen)
    y = torch.rand(g.proj_shape, generator=gen)
    args = (g.beam, g.vol_shape, g.voxel_size, g.det_shape[0], g.to_vectors())
    pj = _astra.projector2d(*args)
    fp_direct = torch.from_numpy(_astra.fp2d(*args, x.numpy(), pj))
    bp_direct = torch.from_numpy(_astra.bp2d(*args, y.numpy(), pj))
    fp_high = torch.from_numpy(_astra.create_sino2d(pj, x.numpy()))
    bp_high = torch.from_numpy(_astra.create_backprojection2d(pj, y.numpy()))
    # same weights, different float32 summation order: measured ≤ 2e-7
    for ours, ref in [(A(x), fp_direct), (A(x), fp_high), (A.T(y), bp_direct), (A.T(y), bp_high)]:
        assert float((ours - ref).norm() / ref.norm()) < 1e-5


def test_matrix_cache():
    g = GEOMS_2D["fan"]()
    args = (g.beam, g.vol_shape, g.voxel_size, g.det_shape[0], g.to_vectors())
    assert _astra.matrix2d(*args) is _astra.matrix2d(*args)


def test_3d_parallel_is_slicewise():
    g3 = Geometry.parallel3d(_angles(9), (5, 16, 16), cor_offset=-1.0, det_spacing=(1.0, 1.2))
    g2 = Geometry.parallel2d(g3.angles, (16, 16), det_count=g3.det_shape[1], cor_offset=-1.0, det_spacing=1.2)
    x = torch.rand(2, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    A3, A2 = RayTransform(g3, backend="astra-cpu"), RayTransform(g2, backend="astra-cpu")
    y3 = A3(x)
    y2 = A2(x.reshape(10, 16, 16)).reshape(2, 5, *g2.proj_shape).transpose(1, 2)
    torch.testing.assert_close(y3, y2, rtol=1e-6, atol=1e-5)  # same matrix, same sums
    torch.testing.assert_close(A3.T(y3), A2.T(y2.transpose(1, 2).reshape(10, *g2.proj_shape)).reshape(2, 5, 16, 16),
                               rtol=1e-6, atol=1e-4)
    ph = torch.from_numpy(ellipsoid(g3.vol_shape, (0, 1, -1), (2, 6, 5)))
    yc, ya = RayTransform(g3, backend="cpu-cone")(ph), A3(ph)
    # trilinear vs ASTRA linear kernels on a smooth object: measured 0.5 % (white noise: 1.6 %)
    assert float((yc - ya).norm() / ya.norm()) < 0.015


def test_3d_parallel_refuses_misaligned_rows():
    g = Geometry.parallel3d(_angles(6), (6, 8, 8), det_shape=(7, 12))
    with pytest.raises(DipuqError, match="slice"):
        RayTransform(g, backend="astra-cpu")
    assert RayTransform(g).backend in ("cpu-cone", "astra-cuda")


# ------------------------------------------------------------------------------------------
# ODL (independent geometry conversion; ODL's volume axes are (x, y), same angle convention)
# ------------------------------------------------------------------------------------------
def test_agrees_with_odl():
    odl = pytest.importorskip("odl")
    from odl.applications import tomo

    n, nd, ang = 24, 36, _angles(10)
    space = odl.uniform_discr([-n / 2, -n / 2], [n / 2, n / 2], (n, n), dtype="float32")
    apart = odl.nonuniform_partition(ang)
    ph = ellipsoid((n, n), (3, -5), (8, 4))
    cases = [
        (tomo.Parallel2dGeometry(apart, odl.uniform_partition(-nd / 2, nd / 2, nd)),
         Geometry.parallel2d(ang, (n, n), det_count=nd)),
    ]
    afan = odl.nonuniform_partition(_angles(10, True))
    cases.append((tomo.FanBeamGeometry(afan, odl.uniform_partition(-nd * 0.75, nd * 0.75, nd), src_radius=50, det_radius=30),
                  Geometry.fan2d(_angles(10, True), (n, n), nd, source_origin=50, origin_detector=30, det_spacing=1.5)))
    for geo, g in cases:
        R = tomo.RayTransform(space, geo, impl="astra_cpu")
        ref = np.asarray(R(R.domain.element(np.ascontiguousarray(ph.T))).data)  # ODL array axes (x, y)
        ours = RayTransform(g, backend="astra-cpu")(torch.from_numpy(ph)).numpy()
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert rel < 1e-5, (g.beam, rel)  # same ASTRA kernel through ODL's own conversion: measured 8e-7


# ------------------------------------------------------------------------------------------
# torch.func / autograd / batching
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_matches_dense(backend):
    g = Geometry.fan2d(_angles(5, True), (6, 6), 9, source_origin=20, origin_detector=10)
    A = RayTransform(g, backend=backend, dtype=torch.float64)
    M = A.as_matrix()  # (45, 36)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(g.proj_shape, generator=gen, dtype=torch.float64)
    X = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    _, jv = torch.func.jvp(A, (x,), (v,))
    torch.testing.assert_close(jv.reshape(-1), M @ v.reshape(-1))
    _, vjp = torch.func.vjp(A, x)
    torch.testing.assert_close(vjp(w)[0].reshape(-1), M.T @ w.reshape(-1))
    torch.testing.assert_close(torch.func.vmap(A)(X).reshape(4, -1), X.reshape(4, -1) @ M.T)
    torch.testing.assert_close(torch.func.vmap(A.T)(torch.stack([w, 2 * w])).reshape(2, -1),
                               torch.stack([w, 2 * w]).reshape(2, -1) @ M)
    xg = x.clone().requires_grad_()
    (A(xg) * w).sum().backward()
    torch.testing.assert_close(xg.grad.reshape(-1), M.T @ w.reshape(-1))
    assert check_jvp_vjp(A, x) < 1e-12  # float64, exact linear map


def test_batch_and_channel_dims():
    g = GEOMS_2D["parallel"]()
    A = RayTransform(g)
    x = torch.rand(2, 3, *g.vol_shape, generator=torch.Generator().manual_seed(0))
    y = A(x)
    assert y.shape == (2, 3, *g.proj_shape)
    torch.testing.assert_close(y[1, 2], A(x[1, 2]))
    assert A.T(y).shape == x.shape


def test_check_jvp_vjp_network_and_failure():
    torch.manual_seed(0)  # test-only: module init
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 3, padding=1))
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert check_jvp_vjp(net, x) < 1e-5  # float32 rounding: measured ~1e-8

    class Bad(torch.autograd.Function):  # backward is 2x what forward mode says
        @staticmethod
        def forward(x):
            return 3 * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 6 * g

        @staticmethod
        def jvp(ctx, t):
            return 3 * t

    assert check_jvp_vjp(Bad.apply, x) > 0.1


# ------------------------------------------------------------------------------------------
# registry, auto, bad input, no SIGFPE
# ------------------------------------------------------------------------------------------
def test_auto_choice_and_available_backends():
    g2 = GEOMS_2D["fan"]()
    gc = Geometry.cone3d(_angles(4, True), (6, 6, 6), (6, 8), source_origin=30, origin_detector=10)
    if not cuda_available():
        assert RayTransform(g2).backend == "astra-cpu"
        assert RayTransform(gc).backend == "cpu-cone"
        assert available_backends(gc) == ["cpu-cone"]
        assert available_backends(g2) == ["astra-cpu", "cpu-cone"]
    assert isinstance(RayTransform(g2), RayTransform) and isinstance(RayTransform(g2), LinearOperator)
    assert RayTransform(g2).range_shape == g2.proj_shape and RayTransform(g2).domain_shape == g2.vol_shape


def test_auto_prefers_cuda_when_available(monkeypatch):
    """The preference order (no ASTRA call: only the registry is asked)."""
    from dipuq.operators import ray

    monkeypatch.setattr(ray, "cuda_available", lambda: True)
    assert ray.available_backends(GEOMS_2D["fan"]()) == ["astra-cuda", "astra-cpu", "cpu-cone"]
    gc = Geometry.cone3d(_angles(4, True), (6, 6, 6), (6, 8), source_origin=30, origin_detector=10)
    assert ray.available_backends(gc) == ["astra-cuda", "cpu-cone"]


def test_bad_input():
    g = GEOMS_2D["parallel"]()
    A = RayTransform(g)
    with pytest.raises(DipuqError, match="shape"):
        A(torch.zeros(23, 24))
    with pytest.raises(DipuqError, match="shape"):
        A.T(torch.zeros(3, 24))
    with pytest.raises(DipuqError, match="shape"):
        A.adjoint(torch.zeros(3, 24))
    with pytest.raises(DipuqError, match="dtype"):
        A(torch.zeros(24, 24, dtype=torch.float64))
    with pytest.raises(DipuqError, match="unknown ray-transform backend"):
        RayTransform(g, backend="magic")
    with pytest.raises(DipuqError, match="Geometry"):
        RayTransform({"beam": "helical"})
    gc = Geometry.cone3d(_angles(4, True), (6, 6, 6), (6, 8), source_origin=30, origin_detector=10)
    with pytest.raises(DipuqError, match="no CPU 3D"):
        RayTransform(gc, backend="astra-cpu")
    with pytest.raises(DipuqError, match="cone"):
        fbp(RayTransform(gc, backend="cpu-cone"), torch.zeros(gc.proj_shape))
    with pytest.raises(DipuqError, match="RayTransform"):
        fbp(MatrixOperator(torch.eye(3)), torch.zeros(3))
    with pytest.raises(DipuqError, match="NaN"):
        fbp(A, torch.full(g.proj_shape, float("nan")))
    with pytest.raises(DipuqError, match="filter"):
        fbp(A, torch.zeros(g.proj_shape), filter="butterworth")
    with pytest.raises(DipuqError):
        cgls(A, torch.zeros(3, 3), 5)


@no_gpu
def test_astra_cuda_without_gpu_raises():
    g = GEOMS_2D["parallel"]()
    with pytest.raises(GPUUnavailableError, match="CUDA"):
        RayTransform(g, backend="astra-cuda")
    from dipuq.operators.ray import AstraCudaTransform

    with pytest.raises(GPUUnavailableError):
        AstraCudaTransform(g)
    with pytest.raises(GPUUnavailableError):
        _astra.CudaProjector3D("cone", (4, 4, 4), 1.0, (4, 4), np.zeros((2, 12)))


@no_gpu
def test_3d_cuda_request_is_a_clean_error_in_a_subprocess():
    """Requesting ASTRA 3D on CPU must raise, not kill Python with SIGFPE (exit code -8)."""
    code = (
        "import numpy as np, torch\n"
        "from dipuq.geometry import Geometry\n"
        "from dipuq.operators import RayTransform, fdk\n"
        "from dipuq.errors import GPUUnavailableError\n"
        "g = Geometry.cone3d(np.linspace(0, 6.28, 4), (8, 8, 8), (8, 8), source_origin=40, origin_detector=10)\n"
        "n = 0\n"
        "for call in (lambda: RayTransform(g, backend='astra-cuda'),\n"
        "             lambda: fdk(RayTransform(g), torch.zeros(g.proj_shape), impl='astra')):\n"
        "    try:\n"
        "        call()\n"
        "    except GPUUnavailableError as e:\n"
        "        n += 1; print(e)\n"
        "y = RayTransform(g)(torch.ones(8, 8, 8))\n"
        "print('caught', n, float(y.sum()) > 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -8 would be SIGFPE
    assert "caught 2 True" in r.stdout


@no_gpu
def test_auto_3d_never_touches_astra_cuda(monkeypatch):
    import astra
    import astra.experimental

    def boom(*a, **k):
        raise AssertionError("ASTRA 3D/CUDA function reached on a CPU-only machine")

    for mod, names in [(astra.projector3d, ["create"]), (astra.data3d, ["create", "link"]),
                       (astra.experimental, ["direct_FP3D", "direct_BP3D"]), (astra.algorithm, ["create"])]:
        for name in names:
            monkeypatch.setattr(mod, name, boom)
    for g in [Geometry.parallel3d(_angles(4), (4, 6, 6)),
              Geometry.cone3d(_angles(4, True), (4, 6, 6), (5, 8), source_origin=30, origin_detector=10)]:
        A = RayTransform(g)
        y = A(torch.ones(g.vol_shape))
        analytic(A, y)
        assert A.backend in ("astra-cpu", "cpu-cone")


# ------------------------------------------------------------------------------------------
# reconstructions
# ------------------------------------------------------------------------------------------
def _disc_case(g, centre, axes):
    ph = torch.from_numpy(ellipsoid(g.vol_shape, centre, axes, voxel_size=g.voxel_size))
    A = RayTransform(g, backend="astra-cpu")
    return A, ph, A(ph)


@pytest.mark.parametrize("kind", ["parallel", "fan"])
def test_fbp_is_quantitative(kind):
    if kind == "parallel":
        g = Geometry.parallel2d(_angles(90), (48, 48), voxel_size=0.5, det_spacing=0.5, cor_offset=3)
        A, ph, y = _disc_case(g, (1, -2), (9, 7))
    else:
        g = Geometry.fan2d(_angles(120, True), (48, 48), 72, source_origin=80, origin_detector=40, cor_offset=2)
        A, ph, y = _disc_case(g, (3, -2), (15, 11))
    mask = ph > 0.999
    outside = ph == 0
    # interior mean vs the true value 1, measured (parallel / fan): ramp 0.989 / 0.998,
    # shepp-logan 0.986 / 0.995, hann 0.975 / 0.986 (smoother filters blur the edge into the mask)
    for filt, tol in [("ramp", 0.02), ("shepp-logan", 0.025), ("hann", 0.04)]:
        rec = fbp(A, y, filter=filt)
        assert abs(float(rec[mask].mean()) - 1) < tol, filt
        assert float(rec[outside].abs().mean()) < 0.05  # background: measured 0.012 / 0.031
    rec = analytic(A, torch.stack([y, 2 * y]))
    torch.testing.assert_close(rec[1], 2 * rec[0], rtol=1e-4, atol=1e-4)


def test_fbp_3d_parallel_slicewise_matches_2d():
    g3 = Geometry.parallel3d(_angles(30), (3, 20, 20), cor_offset=1.5)
    g2 = Geometry.parallel2d(g3.angles, (20, 20), det_count=g3.det_shape[1], cor_offset=1.5)
    x = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(0))
    A3, A2 = RayTransform(g3), RayTransform(g2)
    r3 = fbp(A3, A3(x))
    r2 = fbp(A2, A2(x))
    torch.testing.assert_close(r3, r2, rtol=1e-4, atol=1e-4)  # rows sit exactly on slices: same numbers


@pytest.mark.parametrize("method", ["cgls", "sirt"])
def test_iterative(method):
    g = Geometry.parallel2d(_angles(40), (24, 24))
    A, ph, y = _disc_case(g, (1, 2), (7, 6))
    y2 = torch.stack([y, 0.5 * y])  # batch
    if method == "cgls":
        rec = cgls(A, y2, 30)
        tol = 0.05  # measured 3.3 % after 30 iterations on noise-free data
    else:
        rec = sirt(A, y2, 200, nonneg=True)
        tol = 0.05  # measured 2.7 % after 200 iterations
    for i, s in enumerate([1.0, 0.5]):
        err = float((rec[i] - s * ph).norm() / (s * ph).norm())
        assert err < tol, (method, i, err)
    # residual decreases monotonically for CGLS
    from dipuq.operators.recon import cgls_iterates

    res = [float(st.residual) for st, _ in zip(cgls_iterates(A, y), range(8))]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(res, res[1:]))
    with pytest.raises(DipuqError):
        cgls(A, y, 0)


def test_fdk_requires_cone():
    g = GEOMS_2D["parallel"]()
    with pytest.raises(DipuqError, match="fbp"):
        fdk(RayTransform(g), torch.zeros(g.proj_shape))
