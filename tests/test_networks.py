"""UNet: shapes, padding, torch.func transforms, finite-difference JVP, dropout control."""

import pytest
import torch
from torch.func import functional_call, jvp, vjp, vmap

from dipuq.errors import ConfigError
from dipuq.dip.networks import ChannelDropout, NetworkConfig, UNet, conv_weight_names, count_parameters


def _net(ndim, **kw):
    opts = dict(scales=3, channels=4, skip_channels=(2, 0), generator=torch.Generator().manual_seed(0))
    opts.update(kw)
    return UNet(ndim, **opts)


@pytest.mark.parametrize("ndim,shape", [(2, (2, 1, 30, 29)), (2, (1, 1, 32, 32)), (3, (1, 1, 9, 10, 11))])
def test_shapes_any_size(ndim, shape):
    net = _net(ndim)
    out = net(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    assert out.shape == shape


def test_multichannel_and_sigmoid():
    net = _net(2, in_ch=2, out_ch=3, sigmoid=True)
    out = net(torch.randn(1, 2, 12, 12))
    assert out.shape == (1, 3, 12, 12)
    assert out.min() > 0 and out.max() < 1


def test_no_batchnorm_and_groupnorm_present():
    net = _net(3, groupnorm=2)
    kinds = {type(m).__name__ for m in net.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    assert "GroupNorm" not in {type(m).__name__ for m in _net(2, groupnorm=0).modules()}


def test_conv_weight_names():
    net = _net(2)
    names = conv_weight_names(net)
    params = dict(net.named_parameters())
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(names) == len(convs) and all(n.endswith(".weight") and n in params for n in names)
    assert all(params[n].ndim == 4 for n in names)  # conv kernels, never GroupNorm weights (1-D)
    assert count_parameters(net, names) < count_parameters(net)


def test_conv_weight_names_include_transposed_convolutions():
    # a ConvTranspose layer is a conv layer with its own weights: the linearisation perturbs them
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4),
                              torch.nn.ConvTranspose2d(4, 2, 2, stride=2), torch.nn.Conv3d(2, 1, 1, bias=False))
    assert conv_weight_names(net) == ["0.weight", "2.weight", "3.weight"]
    assert conv_weight_names(torch.nn.ConvTranspose1d(1, 1, 3)) == ["weight"]


def test_same_generator_same_weights():
    a, b = _net(2), _net(2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = _net(2, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(a.outc.weight, c.outc.weight)


@pytest.mark.parametrize("ndim,spatial", [(2, (13, 14)), (3, (6, 7, 5))])
def test_torch_func_jvp_vjp_vmap(ndim, spatial):
    net = _net(ndim)
    z = torch.randn(1, 1, *spatial, generator=torch.Generator().manual_seed(2))
    params = {k: v.detach() for k, v in net.named_parameters()}
    names = conv_weight_names(net)
    w = {k: params[k] for k in names}

    def f(w):
        return functional_call(net, {**params, **w}, (z,))

    g = torch.Generator().manual_seed(3)
    t = {k: torch.randn(v.shape, generator=g) for k, v in w.items()}
    out, jv = jvp(f, (w,), (t,))
    assert jv.shape == out.shape
    out2, pullback = vjp(f, w)
    v = torch.randn(out.shape, generator=g)
    (ct,) = pullback(v)
    # adjoint identity <J t, v> = <t, Jᵀ v>; float32 sums over ~1e3 terms: 1e-4 relative measured ~1e-6
    lhs = (jv * v).sum()
    rhs = sum((t[k] * ct[k]).sum() for k in names)
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-5)
    # vmap over a batch of inputs equals the loop
    zs = torch.randn(3, 1, *spatial, generator=g)
    batched = vmap(lambda zz: functional_call(net, params, (zz[None],))[0])(zs)
    looped = torch.stack([net(zz[None])[0] for zz in zs]).detach()
    assert torch.allclose(batched, looped, atol=1e-6)  # same kernels, batch of 1 vs 3: float32 round-off
    # vmap over tangents (many JVPs at once)
    T = {k: torch.randn(2, *v.shape, generator=g) for k, v in w.items()}
    jvs = vmap(lambda tt: jvp(f, (w,), (tt,))[1])(T)
    single = jvp(f, (w,), ({k: T[k][1] for k in names},))[1]
    # batched vs single convolutions sum in different orders: float32 round-off on values of
    # magnitude ~30, measured max abs difference ~1e-4 (= 3e-6 relative to the max)
    assert torch.allclose(jvs[1], single, rtol=0, atol=1e-5 * float(single.abs().max()) * 10)


def test_jvp_matches_finite_differences_float64():
    net = _net(2, channels=3, skip_channels=(1, 1)).double()
    z = torch.randn(1, 1, 10, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = {k: v.detach() for k, v in net.named_parameters()}
    names = conv_weight_names(net)
    w = {k: params[k] for k in names}
    g = torch.Generator().manual_seed(5)
    t = {k: torch.randn(v.shape, dtype=torch.float64, generator=g) for k, v in w.items()}

    def f(w):
        return functional_call(net, {**params, **w}, (z,))

    _, jv = jvp(f, (w,), (t,))
    h = 1e-6
    fd = (f({k: w[k] + h * t[k] for k in names}) - f({k: w[k] - h * t[k] for k in names})) / (2 * h)
    # central differences: O(h²) truncation + O(eps/h) round-off ≈ 1e-10 relative; LeakyReLU kinks
    # are not crossed at h = 1e-6 for this seed. Measured max rel error ~1e-9.
    assert torch.allclose(jv, fd, rtol=1e-6, atol=1e-8)


def test_dropout_is_explicit_and_uses_generator():
    net = _net(2, dropout=0.3)
    assert net.has_dropout
    z = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = net(z)
        net.train()
        assert torch.equal(net(z), base)  # train() does not switch dropout on
        net.set_dropout(True, torch.Generator().manual_seed(7))
        a1, a2 = net(z), net(z)
        net.set_dropout(True, torch.Generator().manual_seed(7))
        b1 = net(z)
        net.eval()
        assert not torch.equal(net(z), base)  # eval() does not switch it off either
        net.set_dropout(False)
        assert torch.equal(net(z), base)
    assert torch.equal(a1, b1) and not torch.equal(a1, a2)
    assert not _net(2).has_dropout
    assert isinstance([m for m in net.modules() if isinstance(m, ChannelDropout)][0], ChannelDropout)


def test_bad_configs():
    with pytest.raises(ConfigError, match="ndim"):
        UNet(4)
    with pytest.raises(ConfigError, match="channels needs 3"):
        UNet(2, scales=3, channels=(4, 4))
    with pytest.raises(ConfigError, match="skip_channels"):
        UNet(2, scales=3, skip_channels=(1, 1, 1))
    with pytest.raises(ConfigError, match="dropout"):
        NetworkConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="unknown network config"):
        NetworkConfig.from_dict({"scales": 2, "width": 3})
    with pytest.raises(ConfigError, match="expects input"):
        _net(2)(torch.zeros(1, 2, 8, 8))


def test_spec_round_trip():
    net = _net(3, dropout=0.1, sigmoid=True)
    twin = UNet.from_spec(net.spec())
    assert twin.spec() == net.spec()
    twin.load_state_dict(net.state_dict())


def test_residual_net_starts_at_its_input_with_the_plain_jacobian():
    # f(θ; z) = z + U(θ; z) − U(θ₀; z): after anchor_at(z), f(θ₀; z) = z exactly, and ∂f/∂θ is the
    # plain U-Net's (float64, so the comparison is to rounding only)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 1, 12, 10, generator=g, dtype=torch.float64)
    res = _net(2, residual=True).double()
    plain = _net(2).double()
    plain.load_state_dict({k: v for k, v in res.state_dict().items() if k != "anchor"})
    assert torch.allclose(res(z), z + plain(z))  # not anchored yet: z + U(θ; z)
    res.anchor_at(z)
    assert torch.equal(res(z), z)
    params = {k: v.detach() for k, v in res.named_parameters()}
    tangent = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    _, jr = jvp(lambda p: functional_call(res, p, (z,)), (params,), (tangent,))
    _, jp = jvp(lambda p: functional_call(plain, p, (z,)), (params,), (tangent,))
    assert torch.allclose(jr, jp, atol=1e-12)
    # the anchor travels with the state dict into a fresh net of the same spec
    twin = UNet.from_spec(res.spec()).double()
    twin.load_state_dict(res.state_dict())
    assert torch.equal(twin(z), z)
    with pytest.raises(ConfigError, match="anchored"):
        twin(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
