"""The CPU fast paths of the 3D U-Net (FastConv3d: slab split, groups=2, channels_last, 1×1 as matmul)
compute the same function as the plain convolution, under autograd and torch.func; channels = 0."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp, vjp, vmap

from dipuq.dip.networks import FastConv3d, NetworkConfig, UNet, conv_weight_names
from dipuq.errors import ConfigError
from dipuq.posterior.linearise import LinearisedModel


def _close(a, b, msg=None):
    """Equal to float32 rounding: sums over many voxels (weight gradients) scale the tolerance."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.detach().abs().max())), msg=msg)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# (c_in, c_out, kernel, stride, spatial): slab split (even / odd output rows, stride 2), groups=2
# (1 output row), odd c_out with 1 output row (plain fallback), 1×1×1, large enough for oneDNN
CASES = [
    (1, 16, 3, 1, (8, 9, 10)),
    (16, 16, 3, 1, (7, 6, 5)),
    (4, 8, 3, 2, (9, 8, 8)),
    (4, 8, 3, 2, (2, 5, 6)),
    (4, 8, 3, 1, (1, 5, 6)),
    (4, 5, 3, 1, (1, 5, 6)),
    (6, 3, 1, 1, (5, 6, 7)),
    (32, 8, 3, 1, (30, 30, 4)),
]


@pytest.mark.parametrize("fast,cl", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("c_in,c_out,k,stride,spatial", CASES)
def test_fast_conv_equals_dense_forward_and_gradients(c_in, c_out, k, stride, spatial, fast, cl):
    conv = FastConv3d(c_in, c_out, k, stride=stride, padding=k // 2)
    conv.fast, conv.channels_last = fast, cl
    x = torch.randn(1, c_in, *spatial, generator=_gen(0), requires_grad=True)
    ref = F.conv3d(x, conv.weight, conv.bias, stride, k // 2)
    out = conv(x)
    assert out.shape == ref.shape
    _close(out, ref)
    g = torch.randn(ref.shape, generator=_gen(1))
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, want):
        _close(a, b)


def test_fast_conv_off_float64_is_plain_conv3d_bit_for_bit():
    conv = FastConv3d(4, 8, 3, padding=1)
    plain = torch.nn.Conv3d(4, 8, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 6, 6, 6, generator=_gen(0))
    assert torch.equal(conv(x), plain(x))  # both paths off
    conv.fast = conv.channels_last = True
    assert torch.equal(conv.double()(x.double()), plain.double()(x.double()))  # no fast path in float64


def _pair(**kw):
    opts = {"scales": 3, "channels": (4, 8, 8), "skip_channels": (2, 0)}
    opts.update(kw)
    plain = UNet(3, fast_conv=False, channels_last=False, generator=_gen(0), **opts)
    fast = UNet(3, fast_conv=True, channels_last=True, generator=_gen(0), **opts)
    return plain, fast


def test_fast_net_same_parameters_outputs_and_gradients():
    plain, fast = _pair(residual=True)
    assert [(k, v.shape) for k, v in plain.named_parameters()] == [(k, v.shape) for k, v in fast.named_parameters()]
    assert conv_weight_names(plain) == conv_weight_names(fast)
    z = torch.randn(1, 1, 9, 10, 11, generator=_gen(2))
    outs = []
    for net in (plain, fast):
        net.zero_grad()
        out = net(z)
        out.square().mean().backward()
        outs.append((out.detach(), {k: p.grad for k, p in net.named_parameters()}))
    _close(outs[1][0], outs[0][0])
    for k in outs[0][1]:
        _close(outs[1][1][k], outs[0][1][k], msg=k)
    fast.load_state_dict(plain.state_dict())  # checkpoints load both ways
    # the fast layout is really on in plain (eager) use, and off inside torch.func transforms
    h = fast.inc(z)
    assert h.is_contiguous(memory_format=torch.channels_last_3d) and not h.is_contiguous()
    assert plain.inc(z).is_contiguous()


def test_fast_net_torch_func_jvp_vjp_vmap_match_plain_net():
    plain, fast = _pair()
    z = torch.randn(1, 1, 8, 7, 6, generator=_gen(3))
    params = {k: v.detach() for k, v in plain.named_parameters()}
    names = conv_weight_names(plain)
    w = {k: params[k] for k in names}
    g = _gen(4)
    tangents = [{k: torch.randn(v.shape, generator=g) for k, v in w.items()} for _ in range(3)]
    cot = torch.randn(3, 1, 1, 8, 7, 6, generator=g)
    res = []
    for net in (plain, fast):
        def f(w, net=net):
            return functional_call(net, {**params, **w}, (z,))
        out, jv = jvp(f, (w,), (tangents[0],))
        _, pull = vjp(f, w)
        vj = pull(cot[0])[0]
        stacked = {k: torch.stack([t[k] for t in tangents]) for k in names}
        jv_b = vmap(lambda t, f=f: jvp(f, (w,), (t,))[1])(stacked)
        vj_b = vmap(lambda u, pull=pull: pull(u)[0])(cot)
        res.append((out, jv, vj, jv_b, vj_b))
        # adjoint consistency through the net: <J t, u> = <t, Jᵀ u>
        lhs = (jv * cot[0]).sum()
        rhs = sum((tangents[0][k] * vj[k]).sum() for k in names)
        torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)
    (o0, j0, v0, jb0, vb0), (o1, j1, v1, jb1, vb1) = res
    _close(o1, o0)
    _close(j1, j0)
    _close(jb1, jb0)
    _close(jb1[0], j1)
    for k in names:
        _close(v1[k], v0[k], msg=k)
        _close(vb1[k], vb0[k], msg=k)
        _close(vb1[k][0], v1[k], msg=k)


@pytest.mark.parametrize("jvp_mode", ["linearize", "jvp"])
def test_linearised_model_through_fast_net_matches_plain(jvp_mode):
    plain, fast = _pair()
    z = torch.randn(1, 1, 6, 7, 8, generator=_gen(5))
    mp = LinearisedModel(plain, z, jvp_mode=jvp_mode)
    mf = LinearisedModel(fast, z, jvp_mode=jvp_mode)
    assert mf.jvp_mode == jvp_mode and mf.p == mp.p
    v = torch.randn(4, mp.p, generator=_gen(6))
    u = torch.randn(4, *mp.image_shape, generator=_gen(7))
    _close(mf.jvp(v), mp.jvp(v))
    _close(mf.vjp(u), mp.vjp(u))


def test_channels_zero_resolves_per_ndim():
    cfg = NetworkConfig()
    assert cfg.channels == 0
    assert cfg.resolve_channels(2) == (32, 32, 32, 32)
    assert cfg.resolve_channels(3) == (16, 32, 32, 32)
    assert NetworkConfig(scales=1).resolve_channels(3) == (16,)
    assert UNet(3, scales=2, skip_channels=1).channels == (16, 32)
    assert UNet(2, scales=2, skip_channels=1).channels == (32, 32)
    assert UNet(3, scales=2, channels=8).channels == (8, 8)  # explicit ints and tuples as before
    assert UNet(3, scales=2, channels=(4, 6)).channels == (4, 6)
    with pytest.raises(ConfigError, match="channels entries must be >= 1"):
        NetworkConfig(scales=2, channels=(0, 4))


def test_2d_default_network_unchanged():
    a = UNet(2, generator=_gen(0))
    b = UNet(2, channels=32, fast_conv=False, channels_last=False, generator=_gen(0))
    assert [(k, v.shape) for k, v in a.named_parameters()] == [(k, v.shape) for k, v in b.named_parameters()]
    assert sum(p.numel() for p in a.parameters()) == 125349  # the 2d-128 net of benchmarks/dip.py
    assert all(type(m) is not FastConv3d for m in a.modules())
    z = torch.randn(1, 1, 24, 24, generator=_gen(1))
    assert torch.equal(a(z), b(z))


def test_spec_round_trip_new_keys_and_old_specs():
    net = UNet(3, scales=2, skip_channels=1, fast_conv=False, channels_last=True, generator=_gen(0))
    spec = net.spec()
    assert spec["channels"] == [16, 32] and spec["fast_conv"] is False and spec["channels_last"] is True
    twin = UNet.from_spec(spec)
    assert twin.spec() == spec and twin.channels == net.channels
    twin.load_state_dict(net.state_dict())
    old = {k: v for k, v in spec.items() if k not in ("fast_conv", "channels_last")}  # a spec saved before
    assert UNet.from_spec(old).config.fast_conv is True
    cfg = NetworkConfig.from_dict({"fast_conv": False, "channels_last": False, "channels": 0})
    assert (cfg.fast_conv, cfg.channels_last) == (False, False)


@pytest.mark.skipif(not hasattr(torch._C, "_select_conv_backend"), reason="torch without _select_conv_backend")
@pytest.mark.parametrize("c,spatial,stride", [(1, (32, 32, 32), 1), (16, (32, 32, 32), 1), (20, (32, 32, 32), 1),
                                              (32, (32, 32, 32), 1), (16, (64, 64, 64), 2), (32, (16, 16, 16), 1),
                                              (36, (8, 8, 8), 1)])
def test_slow_path_rule_matches_torch_backend_choice(c, spatial, stride):
    # _dense_is_slow mirrors PyTorch's choice; if a new torch changes it, the fast path is still
    # exact but may stop paying (re-measure with benchmarks/dip.py)
    from dipuq.dip.networks import _dense_is_slow

    x, w = torch.zeros(1, c, *spatial), torch.zeros(8, c, 3, 3, 3)
    backend = torch._C._select_conv_backend(x, w, None, [stride] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, None)
    assert _dense_is_slow(x) == (backend == torch._C._ConvBackend.Slow3d)


def test_run_config_accepts_new_network_keys():
    from dipuq.run.config import dumps_config, load_config

    cfg = load_config(None, ["dip.network.fast_conv=false", "dip.network.channels_last=false",
                             "dip.network.channels=0"])
    net = cfg.dip.network
    assert (net.fast_conv, net.channels_last, net.channels) == (False, False, 0)
    text = dumps_config(cfg)
    assert "fast_conv = false  # " in text and "channels = 0  # " in text
    assert load_config(None).dip.network.fast_conv is True
