"""The network linearised around its fitted weights: x(θ) ≈ f(θ*) + J (θ − θ*).

``J = ∂f/∂θ`` at the linearisation point θ* is the (d × p) Jacobian of the DIP network's output
image (d voxels) with respect to its *conv weights* θ ∈ R^p, flattened into one vector in the
order of ``model.param_names``. Biases and normalisation parameters stay frozen at their fitted
values. J is used only through

* ``model.jvp(v)``  = J v    (p → image), forward mode, ``torch.func.jvp``;
* ``model.vjp(u)``  = Jᵀ u   (image → p), reverse mode, ``torch.func.vjp`` cached at θ*;

both batched over any leading dimensions (``torch.func.vmap`` over the batch, or a Python loop,
see ``batching``). ``model.as_matrix()`` gives the dense J for tiny problems (tests, the exact
posterior).

Shapes: weights flat ``(*batch, p)``; images ``(*batch, *image_shape)`` where ``image_shape`` is
``A.domain_shape`` when an operator is given, else the network output without its leading
``(1, 1)`` batch/channel axes.

Example::

    >>> import torch
    >>> from dipuq.posterior.linearise import LinearisedModel
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GELU(),
    ...                           torch.nn.Conv2d(4, 1, 3, padding=1))
    >>> model = LinearisedModel(net, torch.randn(1, 1, 8, 8))
    >>> model.p, model.image_shape
    (72, (8, 8))
    >>> model.jvp(torch.randn(3, model.p)).shape
    torch.Size([3, 8, 8])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch.func import functional_call, jvp, linearize, vjp, vmap

from dipuq.devices import check_same_device
from dipuq.dip.networks import conv_weight_names
from dipuq.errors import DipuqError

__all__ = ["LinearisedModel"]


class LinearisedModel:
    """First-order Taylor expansion of ``net(net_input)`` in a subset of its weights.

    Parameters
    ----------
    net : torch.nn.Module
        The fitted network f(·; z) at θ*. It is put in eval mode (dropout off). Must not use
        BatchNorm running statistics (``torch.func`` needs a pure function; use GroupNorm).
    net_input : Tensor
        The fixed network input z, e.g. ``(1, 1, *image_shape)``.
    A : LinearOperator, optional
        Forward operator; only used to fix and check ``image_shape = A.domain_shape``.
    params : "conv" | "all" | sequence of str
        Which parameters are linearised: all conv weights (default;
        :func:`dipuq.dip.networks.conv_weight_names`, ConvTranspose included), all parameters, or
        an explicit list of parameter names.
    batching : "vmap" | "loop"
        How batches of vectors are pushed through J / Jᵀ. ``vmap`` is faster on CPU and GPU for
        the small-to-medium nets measured in ``benchmarks/samplers.py``; ``loop`` uses less memory.
    chunk_size : int, optional
        Maximum batch handled by one vmap call (memory bound); ``None`` = no limit.
    jvp_mode : "auto" | "linearize" | "jvp"
        ``linearize`` traces the forward pass once (``torch.func.linearize``) so each J v skips
        the primal computation: 1.4–4× faster than ``torch.func.jvp`` on the nets measured in
        ``benchmarks/samplers.py``. ``auto`` uses it when tracing succeeds, else ``jvp``.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        net_input: torch.Tensor,
        A=None,
        params: str | Sequence[str] = "conv",
        batching: str = "vmap",
        chunk_size: int | None = None,
        jvp_mode: str = "auto",
    ):
        if batching not in ("vmap", "loop"):
            raise DipuqError(f"batching must be 'vmap' or 'loop', got {batching!r}")
        check_same_device("LinearisedModel", net=net, net_input=net_input, A=A)
        self.net = net.eval()
        self.net_input = net_input
        self.batching, self.chunk_size = batching, chunk_size
        all_params = dict(net.named_parameters())
        if params == "conv":
            names = conv_weight_names(net)
        elif params == "all":
            names = list(all_params)
        else:
            names = list(params)
        missing = [n for n in names if n not in all_params]
        if missing:
            raise DipuqError(f"network has no parameters named {missing}")
        if not names:
            raise DipuqError("no parameters to linearise (the network has no conv layers?)")
        self.param_names: list[str] = names
        self.param_shapes = [tuple(all_params[n].shape) for n in names]
        self.param_sizes = [math.prod(s) for s in self.param_shapes]
        self.p = sum(self.param_sizes)
        self._fixed = {k: v.detach() for k, v in all_params.items() if k not in names}
        self._fixed.update({k: v.detach() for k, v in net.named_buffers()})
        # shape: (p,)
        self.theta_map = torch.cat([all_params[n].detach().reshape(-1) for n in names])
        with torch.no_grad():
            out = self._forward_raw(self.theta_map)
        if A is not None:
            self.image_shape = tuple(A.domain_shape)
            if out.numel() != math.prod(self.image_shape):
                raise DipuqError(
                    f"network output {tuple(out.shape)} does not match operator domain {self.image_shape}"
                )
        elif out.ndim >= 2 and tuple(out.shape[:2]) == (1, 1):
            self.image_shape = tuple(out.shape[2:])
        else:
            self.image_shape = tuple(out.shape)
        self.d = math.prod(self.image_shape)
        self.dtype, self.device = self.theta_map.dtype, self.theta_map.device
        # Linearisation at θ*: the output (the DIP reconstruction) and the cached VJP function.
        mean, self._vjp_fn = vjp(self._f, self.theta_map)
        self.mean = mean.detach()  # shape: image_shape
        self._jvp_fn = None
        if jvp_mode not in ("auto", "linearize", "jvp"):
            raise DipuqError(f"jvp_mode must be 'auto', 'linearize' or 'jvp', got {jvp_mode!r}")
        if jvp_mode != "jvp":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, self._jvp_fn = linearize(self._f, self.theta_map)
            except Exception:  # noqa: BLE001 - tracing can fail on exotic nets: fall back to jvp
                if jvp_mode == "linearize":
                    raise
        self.jvp_mode = "linearize" if self._jvp_fn is not None else "jvp"
        self.n_jvp = 0  # counts of single-vector J / Jᵀ products (cost accounting)
        self.n_vjp = 0

    # -- the function being linearised -----------------------------------------------------
    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta, self.param_sizes)
        return {n: t.reshape(s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}

    def _forward_raw(self, theta: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, {**self._fixed, **self._unflatten(theta)}, (self.net_input,))

    def _f(self, theta: torch.Tensor) -> torch.Tensor:
        """f(θ) as an image of shape ``image_shape``."""
        return self._forward_raw(theta).reshape(self.image_shape)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """The network output f(θ) (not linearised), shape ``image_shape``."""
        with torch.no_grad():
            return self._f(theta)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """The linearised model f(θ*) + J (θ − θ*) for θ of shape ``(*batch, p)``."""
        return self.mean + self.jvp(theta - self.theta_map)

    # -- J and Jᵀ ------------------------------------------------------------------------------
    def _jvp1(self, v: torch.Tensor) -> torch.Tensor:
        if self._jvp_fn is not None:
            return self._jvp_fn(v)
        return jvp(self._f, (self.theta_map,), (v,))[1]

    def _vjp1(self, u: torch.Tensor) -> torch.Tensor:
        return self._vjp_fn(u)[0]

    def _batched(self, fn, x: torch.Tensor, in_shape, out_shape) -> torch.Tensor:
        k = len(in_shape)
        if tuple(x.shape[x.ndim - k:]) != tuple(in_shape):
            raise DipuqError(f"expected trailing shape {tuple(in_shape)}, got {tuple(x.shape)}")
        lead = x.shape[: x.ndim - k]
        xb = x.reshape(-1, *in_shape).to(self.dtype)
        n = xb.shape[0]
        with torch.no_grad():
            if n == 1:
                out = fn(xb[0]).unsqueeze(0)
            elif self.batching == "loop":
                out = torch.stack([fn(xi) for xi in xb])
            else:
                out = vmap(fn, chunk_size=self.chunk_size)(xb)
        return out.reshape(*lead, *out_shape)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v: weight directions ``(*batch, p)`` -> image perturbations ``(*batch, *image_shape)``."""
        out = self._batched(self._jvp1, v, (self.p,), self.image_shape)
        self.n_jvp += out.numel() // self.d
        return out

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ u: images ``(*batch, *image_shape)`` -> weight space ``(*batch, p)``."""
        out = self._batched(self._vjp1, u, self.image_shape, (self.p,))
        self.n_vjp += out.numel() // self.p
        return out

    def as_matrix(self, dtype: torch.dtype | None = None, batch: int = 256) -> torch.Tensor:
        """Dense Jacobian J, shape ``(d, p)``, from d VJPs (or p JVPs if p < d); tiny problems only."""
        rows = []
        if self.d <= self.p:
            eye = torch.eye(self.d, dtype=self.dtype, device=self.device)
            for i in range(0, self.d, batch):
                rows.append(self.vjp(eye[i : i + batch].reshape(-1, *self.image_shape)))
            J = torch.cat(rows)
        else:
            eye = torch.eye(self.p, dtype=self.dtype, device=self.device)
            for i in range(0, self.p, batch):
                rows.append(self.jvp(eye[i : i + batch]).reshape(-1, self.d))
            J = torch.cat(rows).T
        return J.to(dtype or self.dtype)

    def __repr__(self) -> str:
        return f"LinearisedModel(p={self.p}, image_shape={self.image_shape}, {len(self.param_names)} tensors)"
