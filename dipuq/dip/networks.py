"""U-Net generators f(θ; z) for the deep image prior, in 2D and 3D.

The network is a map ``f(θ; z): R^(in_ch × *spatial) -> R^(out_ch × *spatial)`` with weights θ
and a fixed input ``z`` (the FBP/FDK reconstruction or fixed noise). It is written so that
``torch.func.functional_call``, ``jvp``, ``vjp`` and ``vmap`` work through it: normalisation is
GroupNorm (no running statistics; BatchNorm breaks ``torch.func``), and dropout (for the MC-dropout
baseline) is switched on and off *explicitly* with :meth:`UNet.set_dropout`, independently of
``train()`` / ``eval()``, and draws its masks from a ``torch.Generator`` that is passed in.

Shapes: inputs and outputs are ``(batch, channel, [z,] y, x)``. Spatial sizes need not be
divisible by ``2^(scales-1)``: the input is padded (replicate) up to the next multiple inside
:meth:`UNet.forward` and the output cropped back.

Architecture (``scales = L`` levels, level 0 = full resolution)::

    enc_0 = block(z)                     channels[0]
    enc_i = block(stride-2 conv(enc_{i-1}))   channels[i],  i = 1..L-1
    skip_i = 1x1 conv(enc_i)             skip_channels[i], i = 0..L-2 (0 = no skip)
    dec_{L-1} = enc_{L-1}
    dec_i = block(cat(upsample(dec_{i+1}), skip_i))   channels[i]
    f = 1x1 conv(dec_0)  [-> sigmoid]

where ``block`` is two 3×3(×3) convolutions, each followed by GroupNorm and LeakyReLU(0.2), then
optional channel dropout.

CPU speed (3D only; 2D runs exactly as before): on CPU PyTorch computes a batch-1 ``Conv3d`` with
few channels through its slow vol2col path and larger ones through oneDNN. With ``fast_conv``
each convolution that would take the slow path is computed as one batch-2 convolution of two
overlapping halves of the volume (which goes to oneDNN), with ``channels_last`` every 3D layer
runs in the ``channels_last_3d`` layout, and ``channels=0`` (the default) uses 16 channels at the
full-resolution level of a 3D net, where most of the work is. The first two compute the same
function (to float rounding) with the same parameters: names, shapes, checkpoints and
``torch.func`` are unchanged. Together 2.3× (32³) and 2.7× (64³) faster forward + backward on
one thread (``benchmarks/dip.py``; :class:`FastConv3d`).

Example::

    >>> net = UNet(ndim=2, scales=3, channels=8, skip_channels=2)
    >>> net(torch.zeros(1, 1, 30, 30)).shape
    torch.Size([1, 1, 30, 30])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dipuq.errors import ConfigError

__all__ = ["ChannelDropout", "NetworkConfig", "UNet", "config_from_dict", "conv_weight_names", "count_parameters"]

_NEG_SLOPE = 0.2


def _opt(default, help: str):
    """A field with a help text (written beside the key in a run's ``config.toml``)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class NetworkConfig:
    """Configuration of a :class:`UNet` (everything except ``ndim`` and channel counts in/out).

    Parameters
    ----------
    scales : number of resolution levels (1 = no down-sampling)
    channels : feature channels per level, an int (same at every level) or ``scales`` ints;
        0 (the default) = automatic: 32 per level in 2D; in 3D 32 per level but 16 at the
        full-resolution level (level 0), which costs most per channel
    skip_channels : skip-connection channels per level ``0..scales-2``, an int or ``scales - 1``
        ints; 0 disables that skip
    groupnorm : number of GroupNorm groups (reduced to a divisor of each layer's channels);
        0 disables normalisation
    dropout : channel-dropout probability after each block (0 = no dropout layers; > 0 for
        MC dropout)
    sigmoid : squash the output through a sigmoid (default: linear output)
    residual : learn a correction to the input: f(θ; z) = z + U(θ; z) − U(θ₀; z), where the
        anchor U(θ₀; z) is the untrained net's output, stored by :meth:`UNet.anchor_at` when the
        fit starts. The fit then starts *at* its input (the TV or FBP/FDK reconstruction), and the
        Jacobian ∂f/∂θ is the plain U-Net's (a zero-initialised output layer would also start
        at z, but its Jacobian at the fit is that of a last-layer model, and on the quick demo
        its error bars ranked the errors far worse: Spearman 0.29 against 0.70). Needs
        ``in_ch == out_ch``; not with ``sigmoid``
    fast_conv : on CPU (float32), compute each 3D convolution that PyTorch would run through its
        slow dense path as an equal batch-2 (or groups=2) convolution that goes to oneDNN (module
        docstring, :class:`FastConv3d`); same parameters, same outputs to float rounding. No
        effect in 2D or on GPUs
    channels_last : run the convolutions of a 3D net on CPU (float32) in the ``channels_last_3d``
        memory format; no effect in 2D or on GPUs
    """

    scales: int = _opt(4, "resolution levels of the U-Net (1 = no down-sampling)")
    channels: int | tuple[int, ...] = _opt(
        0, "feature channels per level: an int, one per level, or 0 = auto (2D 32; 3D 16 at full resolution, 32 below)")
    skip_channels: int | tuple[int, ...] = _opt(4, "skip-connection channels per level 0..scales-2 (0 = no skip)")
    groupnorm: int = _opt(4, "GroupNorm groups (0 = no normalisation)")
    dropout: float = _opt(0.0, "channel-dropout probability after each block (> 0 for MC dropout)")
    sigmoid: bool = _opt(False, "squash the output through a sigmoid")
    residual: bool = _opt(False, "output z + U(θ; z): learn a correction to the FBP/FDK input")
    fast_conv: bool = _opt(True, "3D on CPU: run small convolutions through oneDNN (same function, faster)")
    channels_last: bool = _opt(True, "3D on CPU: channels_last_3d memory layout (same function, faster)")

    def __post_init__(self):
        if isinstance(self.channels, Sequence):
            self.channels = tuple(int(c) for c in self.channels)
        if isinstance(self.skip_channels, Sequence):
            self.skip_channels = tuple(int(c) for c in self.skip_channels)
        if isinstance(self.groupnorm, bool):
            self.groupnorm = 4 if self.groupnorm else 0
        if not isinstance(self.scales, int) or self.scales < 1:
            raise ConfigError(f"network.scales must be a positive integer, got {self.scales!r}")
        if self.channels != 0:  # 0 = automatic, resolved by resolve_channels(ndim)
            _per_level(self.channels, self.scales, "channels", minimum=1)
        _per_level(self.skip_channels, self.scales - 1, "skip_channels", minimum=0)
        if self.groupnorm < 0:
            raise ConfigError(f"network.groupnorm must be >= 0 groups, got {self.groupnorm}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"network.dropout must be in [0, 1), got {self.dropout}")
        if self.residual and self.sigmoid:
            raise ConfigError("network.residual and network.sigmoid cannot both be on")

    def resolve_channels(self, ndim: int) -> tuple[int, ...]:
        """The channels per level for a ``ndim``-D net (``channels = 0`` made explicit)."""
        if self.channels == 0:
            return (32,) * self.scales if ndim == 2 else (16,) + (32,) * (self.scales - 1)
        return _per_level(self.channels, self.scales, "channels", 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("channels", "skip_channels"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        """Build from a plain dict (e.g. a config file section); unknown keys are errors."""
        return config_from_dict(cls, d, "network")


def config_from_dict(cls, d: dict, section: str):
    """``cls(**d)`` for a config dataclass ``cls``, refusing keys it has no field for; ``section``
    names the config section in the error message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {section} config keys {unknown}; allowed: {sorted(names)}")
    return cls(**d)


def _per_level(value, n: int, what: str, minimum: int) -> tuple[int, ...]:
    vals = (int(value),) * n if isinstance(value, int) else tuple(value)
    if len(vals) != n:
        raise ConfigError(f"network.{what} needs {n} entries (one per level), got {len(vals)}")
    if any(v < minimum for v in vals):
        raise ConfigError(f"network.{what} entries must be >= {minimum}, got {list(vals)}")
    return vals


def _groups(ch: int, want: int) -> int:
    """Largest divisor of ``ch`` that is <= ``want``."""
    return max(g for g in range(1, min(ch, want) + 1) if ch % g == 0)


class ChannelDropout(nn.Module):
    """Channel dropout x -> x ⊙ b / (1 - p), b ~ Bernoulli(1 - p) per (sample, channel).

    Off unless switched on with ``active = True`` (see :meth:`UNet.set_dropout`); ``train()`` /
    ``eval()`` do not touch it. Masks are drawn from ``self.generator`` (None = torch's default).
    """

    def __init__(self, p: float, ndim: int):
        super().__init__()
        self.p, self.ndim = float(p), ndim
        self.active = False
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or self.p == 0.0:
            return x
        shape = (*x.shape[:2], *(1,) * self.ndim)
        gen = self.generator
        dev = gen.device if gen is not None else x.device  # e.g. a CPU generator for a CUDA net
        keep = torch.empty(shape, dtype=x.dtype, device=dev).bernoulli_(1.0 - self.p, generator=gen)
        return x * keep.to(x.device) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, active={self.active}"


#: PyTorch (``use_mkldnn`` in ATen's Convolution.cpp) sends a float32 CPU convolution of batch 1
#: with groups = 1 and a 3×3(×3) kernel to its slow native path when size(0..3) multiply to at
#: most this; for a 3D input (1, C, D, H, W) that is C·D·H. Measured on torch 2.13 CPU.
_SLOW_DENSE_MAX = 20480


def _dense_is_slow(x: torch.Tensor) -> bool:
    """Whether ``F.conv3d(x, w)`` (groups=1, 3×3×3) would take PyTorch's slow CPU path."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1
            and x.shape[1] * x.shape[2] * x.shape[3] <= _SLOW_DENSE_MAX)


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` with the same parameters and the same function, faster on CPU (float32).

    ``fast``: a batch-1 convolution that PyTorch would run through its slow native path
    (:func:`_dense_is_slow`) is computed as one batch-2 convolution of two overlapping slabs of the
    input (:func:`_split_conv3d`), or, when the output has a single row along the first spatial
    axis, as the identical groups=2 convolution of ``cat([x, x])`` with the unchanged weight
    (needs an even ``out_channels``); both go to oneDNN. ``channels_last``: inputs and weights
    in the ``channels_last_3d`` layout, 1×1×1 convolutions as a matmul on it. With both off, on a
    GPU or in float64 it is exactly ``nn.Conv3d``.
    """

    fast = False
    channels_last = False

    def _conv_forward(self, x, weight, bias):
        cpu32 = x.device.type == "cpu" and x.dtype == torch.float32
        if not cpu32 or not isinstance(self.padding, tuple) or self.padding_mode != "zeros" or self.groups != 1:
            return super()._conv_forward(x, weight, bias)
        cl = self.channels_last and not (_in_transform(x) or _in_transform(weight))
        if self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.padding == (0, 0, 0):
            if not cl:
                return super()._conv_forward(x, weight, bias)
            # a 1×1×1 conv is a matmul over channels: on the channels-last layout that is
            # F.linear on a (1, D, H, W, C) view, which keeps the layout (the native 1×1 path
            # would copy to and from the contiguous one)
            y = F.linear(_channels_last(x).permute(0, 2, 3, 4, 1), weight.flatten(1), bias)
            return y.permute(0, 4, 1, 2, 3)
        groups = 1
        if self.fast and _dense_is_slow(x):
            if _out_len(x.shape[2], self) >= 2:
                return _split_conv3d(x, weight, bias, self, cl)
            if self.out_channels % 2 == 0:
                x, groups = torch.cat([x, x], dim=1), 2
        if cl:
            x, weight = _channels_last(x), _channels_last(weight)
        return F.conv3d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _in_transform(t: torch.Tensor) -> bool:
    """Whether ``t`` is inside a ``torch.func`` transform (a vmap / jvp / grad wrapper) or a
    forward-AD dual level (``torch.func.linearize`` traces one); True if this torch cannot tell.
    The channels-last layout stays off there: vmap's and forward AD's GroupNorm rules refuse it."""
    return _WRAPPED is None or bool(_WRAPPED(t)) or getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous(memory_format=torch.channels_last_3d)`` for a 5-D ``t``, spelt with permutes,
    which ``torch.func.vmap`` supports (it refuses ``memory_format`` conversions)."""
    return t.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)


def _out_len(n: int, conv) -> int:
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _split_conv3d(x, weight, bias, conv, channels_last: bool):
    """The batch-1 conv ``conv(x)`` as one batch-2 conv (oneDNN) of two overlapping slabs of
    ``x`` along its first spatial axis, each giving (at least) half of the output rows."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    span = d * (k - 1) + 1
    xp = F.pad(x, (0, 0, 0, 0, p, p))
    n_out = _out_len(x.shape[2], conv)
    half = (n_out + 1) // 2
    a = xp[:, :, : s * (half - 1) + span]
    b = xp[:, :, s * (n_out - half): s * (n_out - 1) + span]
    xb = torch.cat([a, b], dim=0)
    if channels_last:
        xb, weight = _channels_last(xb), _channels_last(weight)
    y = F.conv3d(xb, weight, bias, conv.stride, (0, *conv.padding[1:]), conv.dilation)
    return torch.cat([y[:1], y[1:, :, 2 * half - n_out:]], dim=2)


def _conv_cls(ndim: int) -> type[nn.Module]:
    return nn.Conv2d if ndim == 2 else FastConv3d


class _Block(nn.Sequential):
    """conv(stride) -> GN -> LeakyReLU -> conv -> GN -> LeakyReLU [-> dropout]."""

    def __init__(self, ndim, c_in, c_out, groups, dropout, stride=1):
        Conv = _conv_cls(ndim)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(((c_in, c_out), (c_out, c_out))):
            layers.append(Conv(a, b, 3, stride=stride if i == 0 else 1, padding=1))
            if groups:
                layers.append(nn.GroupNorm(_groups(b, groups), b))
            layers.append(nn.LeakyReLU(_NEG_SLOPE))
        if dropout > 0:
            layers.append(ChannelDropout(dropout, ndim))
        super().__init__(*layers)


class _Skip(nn.Sequential):
    def __init__(self, ndim, c_in, c_out, groups):
        Conv = _conv_cls(ndim)
        layers: list[nn.Module] = [Conv(c_in, c_out, 1)]
        if groups:
            layers.append(nn.GroupNorm(_groups(c_out, groups), c_out))
        layers.append(nn.LeakyReLU(_NEG_SLOPE))
        super().__init__(*layers)


class UNet(nn.Module):
    """Encoder–decoder U-Net f(θ; z) for 2D images or 3D volumes (see the module docstring).

    Parameters
    ----------
    ndim : 2 (inputs ``(batch, ch, y, x)``) or 3 (``(batch, ch, z, y, x)``)
    in_ch, out_ch : input / output channels
    scales, channels, skip_channels, groupnorm, dropout, sigmoid, residual, fast_conv,
    channels_last : see :class:`NetworkConfig`
    generator : draws the initial weights (Kaiming-uniform, PyTorch's default scheme); None uses
        torch's default generator

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> net = UNet(ndim=3, scales=2, channels=4, skip_channels=1, generator=g)
        >>> net(torch.zeros(2, 1, 5, 6, 7)).shape
        torch.Size([2, 1, 5, 6, 7])
    """

    def __init__(
        self,
        ndim: int = 2,
        in_ch: int = 1,
        out_ch: int = 1,
        scales: int = 4,
        channels: int | Sequence[int] = 0,
        skip_channels: int | Sequence[int] = 4,
        groupnorm: int | bool = 4,
        dropout: float = 0.0,
        sigmoid: bool = False,
        generator: torch.Generator | None = None,
        residual: bool = False,
        fast_conv: bool = True,
        channels_last: bool = True,
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ConfigError(f"UNet ndim must be 2 or 3, got {ndim!r}")
        self.config = NetworkConfig(scales, channels, skip_channels, groupnorm, dropout, sigmoid, residual,
                                    fast_conv, channels_last)
        if residual and in_ch != out_ch:
            raise ConfigError(f"network.residual needs as many input as output channels, got {in_ch} and {out_ch}")
        cfg = self.config
        self.ndim, self.in_ch, self.out_ch = ndim, int(in_ch), int(out_ch)
        ch = cfg.resolve_channels(ndim)
        sk = _per_level(cfg.skip_channels, cfg.scales - 1, "skip_channels", 0)
        self.scales, self.channels, self.skip_channels = cfg.scales, ch, sk
        G, p = cfg.groupnorm, cfg.dropout

        self.inc = _Block(ndim, self.in_ch, ch[0], G, p)
        self.down = nn.ModuleList(_Block(ndim, ch[i - 1], ch[i], G, p, stride=2) for i in range(1, cfg.scales))
        self.skip = nn.ModuleList(
            _Skip(ndim, ch[i], sk[i], G) if sk[i] > 0 else nn.Identity() for i in range(cfg.scales - 1)
        )
        self.up = nn.ModuleList(_Block(ndim, ch[i + 1] + sk[i], ch[i], G, p) for i in range(cfg.scales - 1))
        self.outc = _conv_cls(ndim)(ch[0], self.out_ch, 1)
        self._mode = "bilinear" if ndim == 2 else "trilinear"
        for m in self.modules():
            if isinstance(m, FastConv3d):
                m.fast, m.channels_last = cfg.fast_conv, cfg.channels_last
        # residual nets: U(θ₀; z), set by anchor_at (empty = not anchored: f = z + U(θ; z))
        if cfg.residual:
            self.register_buffer("anchor", torch.zeros(0))
        self.reset_parameters(generator)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: NetworkConfig, ndim: int, in_ch: int = 1, out_ch: int = 1,
                    generator: torch.Generator | None = None) -> UNet:
        """Build the network a :class:`NetworkConfig` describes."""
        return cls(ndim, in_ch, out_ch, cfg.scales, cfg.channels, cfg.skip_channels, cfg.groupnorm,
                   cfg.dropout, cfg.sigmoid, generator=generator, residual=cfg.residual,
                   fast_conv=cfg.fast_conv, channels_last=cfg.channels_last)

    def spec(self) -> dict:
        """Everything needed to rebuild this network (``UNet.from_spec(net.spec())``); ``channels``
        as resolved for this ``ndim`` (so ``channels = 0`` is stored as the per-level list)."""
        return {"ndim": self.ndim, "in_ch": self.in_ch, "out_ch": self.out_ch, **self.config.to_dict(),
                "channels": list(self.channels)}

    @classmethod
    def from_spec(cls, spec: dict, generator: torch.Generator | None = None) -> UNet:
        spec = dict(spec)
        ndim, in_ch, out_ch = spec.pop("ndim"), spec.pop("in_ch", 1), spec.pop("out_ch", 1)
        return cls.from_config(NetworkConfig.from_dict(spec), ndim, in_ch, out_ch, generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw all weights: convs Kaiming-uniform (a=√5, PyTorch's default), GroupNorm (1, 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def anchor_at(self, z: torch.Tensor) -> None:
        """Residual nets: store U(θ; z) at the current weights, so that from now on
        f(θ; z) = z + U(θ; z) − U(θ_now; z) and f(θ_now; z) = z exactly (no-op otherwise)."""
        if not self.config.residual:
            return
        drop = [(m, m.active) for m in self.modules() if isinstance(m, ChannelDropout)]
        for m, _ in drop:
            m.active = False
        try:
            self.anchor = self._unet(z).detach().clone()
        finally:
            for m, a in drop:
                m.active = a

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        a = state_dict.get(prefix + "anchor")
        if a is not None and self.config.residual and a.shape != self.anchor.shape:  # an anchored net: take the anchor's shape
            self.anchor = torch.empty_like(a, device=self.anchor.device, dtype=self.anchor.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- dropout control -----------------------------------------------------------------
    @property
    def has_dropout(self) -> bool:
        return any(isinstance(m, ChannelDropout) for m in self.modules())

    def set_dropout(self, active: bool, generator: torch.Generator | None = None) -> UNet:
        """Switch every dropout layer on or off (independently of ``train()``/``eval()``)."""
        for m in self.modules():
            if isinstance(m, ChannelDropout):
                m.active, m.generator = bool(active), generator
        return self

    # -- forward -------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """f(θ; z) for z of shape (batch, in_ch, [z,] y, x) -> (batch, out_ch, [z,] y, x)."""
        out = self._unet(z)
        if self.config.residual:
            if self.anchor.numel():
                if self.anchor.shape[1:] != out.shape[1:]:
                    raise ConfigError(f"residual UNet anchored at an input of shape {tuple(self.anchor.shape)}, "
                                      f"called on {tuple(z.shape)}")
                out = out - self.anchor
            out = out + z
        return out

    def _unet(self, z: torch.Tensor) -> torch.Tensor:
        """U(θ; z): the U-Net without the residual path."""
        if z.ndim != self.ndim + 2 or z.shape[1] != self.in_ch:
            raise ConfigError(
                f"UNet(ndim={self.ndim}, in_ch={self.in_ch}) expects input (batch, {self.in_ch}, "
                f"{'z, ' if self.ndim == 3 else ''}y, x), got shape {tuple(z.shape)}"
            )
        spatial = z.shape[2:]
        mult = 2 ** (self.scales - 1)
        extra = [(-s) % mult for s in spatial]
        if any(extra):
            pad = []
            for e in reversed(extra):  # F.pad lists the last dim first
                pad += [e // 2, e - e // 2]
            z = F.pad(z, pad, mode="replicate")

        h = self.inc(z)
        skips = []
        for i, down in enumerate(self.down):
            skips.append(self.skip[i](h) if self.skip_channels[i] > 0 else None)
            h = down(h)
        for i in reversed(range(self.scales - 1)):
            h = F.interpolate(h, scale_factor=2, mode=self._mode, align_corners=False)
            if skips[i] is not None:
                h = torch.cat([h, skips[i]], dim=1)
            h = self.up[i](h)
        out = self.outc(h)
        if self.config.sigmoid:
            out = torch.sigmoid(out)

        if any(extra):
            idx = [slice(None), slice(None)]
            for e, s in zip(extra, spatial):
                idx.append(slice(e // 2, e // 2 + s))
            out = out[tuple(idx)]
        return out


def conv_weight_names(net: nn.Module) -> list[str]:
    """Names (as in ``net.named_parameters()``) of the weights of every convolution layer of ``net``:
    ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` (all subclasses of torch's ``_ConvNd``).

    These are the parameters the linearised model perturbs (DESIGN §2: biases and normalisation
    parameters stay at θ*). A transposed convolution is a convolution's adjoint with its own
    weights, which shape the output as much as any other conv's; leaving them out would freeze
    them at θ* and under-state the uncertainty of a network that up-samples with them. (The
    :class:`UNet` up-samples by interpolation and has none.)
    """
    names = []
    for mod_name, m in net.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight is not None:
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def count_parameters(net: nn.Module, names: Sequence[str] | None = None) -> int:
    """Number of scalar parameters (all, or those in ``names``)."""
    params = dict(net.named_parameters())
    keys = params if names is None else names
    return sum(params[k].numel() for k in keys)
