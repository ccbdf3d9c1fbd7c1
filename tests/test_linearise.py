"""LinearisedModel: J v and Jᵀ u against each other, finite differences and the dense Jacobian."""

import pytest
import torch

from dipuq.errors import DipuqError
from dipuq.dip.networks import conv_weight_names
from dipuq.posterior.gprior import gprior_diagonal, gprior_scale
from dipuq.posterior.linearise import LinearisedModel
from dipuq.operators.base import MatrixOperator


def tiny_net(ndim=2, ch=8, seed=0, dtype=torch.float32):
    """A few-thousand-weight conv net with GroupNorm (BatchNorm breaks torch.func)."""
    torch.manual_seed(seed)
    Conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    net = torch.nn.Sequential(
        Conv(1, ch, 3, padding=1), torch.nn.GroupNorm(2, ch), torch.nn.SiLU(),
        Conv(ch, ch, 3, padding=1), torch.nn.GroupNorm(2, ch), torch.nn.SiLU(), Conv(ch, 1, 1),
    )
    return net.to(dtype)


def _model(dtype=torch.float32, n=8, **kw):
    net = tiny_net(dtype=dtype)
    z = torch.randn(1, 1, n, n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return LinearisedModel(net, z, **kw)


def test_only_conv_weights_are_linearised():
    model = _model()
    names = conv_weight_names(model.net)
    assert model.param_names == names == ["0.weight", "3.weight", "6.weight"]
    assert model.p == 8 * 9 + 8 * 8 * 9 + 8
    assert model.image_shape == (8, 8)
    torch.testing.assert_close(model.mean, model.net(model.net_input)[0, 0].detach())


def test_transposed_convolutions_are_linearised():
    # up-sampling by ConvTranspose2d: its weights shape the output and are part of θ
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.SiLU(),
                              torch.nn.ConvTranspose2d(4, 1, 2, stride=2))
    model = LinearisedModel(net, torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert model.param_names == ["0.weight", "2.weight"] and model.p == 4 * 9 + 4 * 4
    v = torch.zeros(model.p)
    v[4 * 9:] = 1.0  # a direction in the ConvTranspose weights only
    assert model.jvp(v).abs().max() > 0


def test_adjoint_identity_batched():
    model = _model()
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(5, model.p, generator=gen)
    u = torch.randn(5, *model.image_shape, generator=gen)
    Jv, JTu = model.jvp(v), model.vjp(u)
    assert Jv.shape == (5, 8, 8) and JTu.shape == (5, model.p)
    lhs, rhs = (Jv * u).sum((1, 2)).double(), (v * JTu).sum(1).double()
    # float32 rounding of sums over p ~ 700 terms: measured |err| / (|Jv||u|) ~ 1e-8; 1e-5 is loose.
    rel = (lhs - rhs).abs() / (Jv.flatten(1).norm(dim=1) * u.flatten(1).norm(dim=1)).double()
    assert rel.max() < 1e-5
    from dipuq.testing import check_jvp_vjp

    # the shipped checker on the same function (forward vs reverse mode), same float32 bound
    assert check_jvp_vjp(model._f, model.theta_map) < 1e-5


def test_jvp_matches_finite_differences_float64():
    model = _model(dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(model.p, generator=gen, dtype=torch.float64)
    v = v / v.norm()
    h = 1e-5
    fd = (model.forward(model.theta_map + h * v) - model.forward(model.theta_map - h * v)) / (2 * h)
    Jv = model.jvp(v)
    # central differences in float64, unit-norm direction: error O(h²) plus rounding 1e-16/h;
    # measured relative error 4e-9 at h = 1e-4, 7e-11 at h = 1e-5, so 1e-8 has a 100x margin.
    assert (Jv - fd).norm() / Jv.norm() < 1e-8


@pytest.mark.parametrize("kw", [{"batching": "loop"}, {"jvp_mode": "jvp"}, {"chunk_size": 2}])
def test_batching_modes_agree_and_dense_oracle(kw):
    ref, model = _model(), _model(**kw)
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(3, 2, model.p, generator=gen)  # any leading dims
    u = torch.randn(3, *model.image_shape, generator=gen)
    # different float32 summation orders only: measured max |diff| ~ 1e-6.
    torch.testing.assert_close(model.jvp(v), ref.jvp(v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.vjp(u), ref.vjp(u), rtol=1e-5, atol=1e-5)
    J = ref.as_matrix(torch.float64)
    assert J.shape == (64, ref.p)
    torch.testing.assert_close(ref.jvp(v[0]).reshape(2, -1).double(), v[0].double() @ J.T, rtol=1e-5, atol=1e-5)


def test_linearised_model_is_affine_and_exact_at_theta_map():
    model = _model()
    torch.testing.assert_close(model(model.theta_map), model.mean)
    model = _model(dtype=torch.float64)
    d = torch.randn(model.p, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1e-2

    def remainder(t):
        return float((model(model.theta_map + t * d) - model.forward(model.theta_map + t * d)).norm())

    # first-order Taylor: the remainder is O(t²), so halving t divides it by 4 (measured 3.9-4.0)
    assert 3.6 < remainder(1.0) / remainder(0.5) < 4.4
    assert 3.6 < remainder(0.5) / remainder(0.25) < 4.4


def test_gprior_diagonal_monte_carlo_vs_exact():
    model = _model()
    gen = torch.Generator().manual_seed(6)
    A = MatrixOperator(torch.randn(40, 64, generator=gen) / 8, (8, 8), (40,))
    exact = gprior_diagonal(model, A, n_probes=None)
    AJ = A.as_matrix(torch.float64) @ model.as_matrix(torch.float64)
    torch.testing.assert_close(exact, AJ.pow(2).sum(0), rtol=1e-4, atol=1e-8)
    mc = gprior_diagonal(model, A, n_probes=400, generator=gen)
    # each entry is a mean of 400 scaled χ²₁ draws: relative std sqrt(2/400) = 7 %; the median
    # relative error over p entries is ≈ 0.67 × 7 % = 4.7 %, so 7 % leaves margin (measured 4.6 %).
    assert ((mc - exact).abs() / exact).median() < 0.07
    s = gprior_scale(model, A, n_probes=None)
    # with c = m, every column of A J̃ = A J diag(s) has squared norm m
    torch.testing.assert_close((AJ * s.double()).pow(2).sum(0), torch.full((model.p,), 40.0, dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_bad_inputs():
    net = tiny_net()
    with pytest.raises(DipuqError, match="no parameters named"):
        LinearisedModel(net, torch.randn(1, 1, 8, 8), params=["nope.weight"])
    A = MatrixOperator(torch.randn(10, 49), (7, 7), (10,))
    with pytest.raises(DipuqError, match="does not match operator domain"):
        LinearisedModel(net, torch.randn(1, 1, 8, 8), A)
