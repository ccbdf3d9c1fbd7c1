"""Matrix-free linear operators on torch tensors.

A :class:`LinearOperator` is a linear map ``A: R^domain_shape -> R^range_shape``. Subclasses
implement only :meth:`_apply` and :meth:`_adjoint` on a batch ``(n, *shape)``; this base class
derives everything else: broadcasting over leading batch dimensions, ``A.T``, composition
``B @ A``, ``A.normal()`` (AᵀA), sums ``A + B`` and scalar multiples ``c * A``, ``A / c``, a dense
oracle ``as_matrix()``, and the rules that make ``A(x)`` work inside ``torch.autograd`` *and*
``torch.func`` (``jvp``, ``vjp``, ``vmap``): A is linear, so its JVP is ``A`` and its VJP is ``Aᵀ``.
Derived operators apply their parts in the order the expression reads, so ``(B @ A)(x)`` is
``B(A(x))`` and ``(A / c + D)(x)`` is ``A(x) / c + D(x)`` to the last bit.

Shapes: ``A(x)`` takes ``x`` of shape ``(*batch, *domain_shape)`` and returns
``(*batch, *range_shape)``; any number of leading dimensions (batch, channel, vmap) is allowed.

Example::

    >>> import torch
    >>> from dipuq.operators import MatrixOperator
    >>> A = MatrixOperator(torch.randn(5, 3))
    >>> x = torch.randn(2, 3)
    >>> A(x).shape, A.T(A(x)).shape
    (torch.Size([2, 5]), torch.Size([2, 3]))
"""

from __future__ import annotations

import math

import torch

from dipuq.errors import DipuqError

__all__ = [
    "LinearOperator", "MatrixOperator", "ComposedOperator", "AdjointOperator", "SumOperator", "ScaledOperator",
    "DiagonalOperator", "IdentityOperator", "RowsOperator",
]


class _Apply(torch.autograd.Function):
    """y = A x (or Aᵀ x) with backward Aᵀ (or A), forward-mode A and a batching rule."""

    @staticmethod
    def forward(x, op, adjoint):
        return op._raw(x, adjoint)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, op, adjoint = inputs
        ctx.op, ctx.adjoint = op, adjoint

    @staticmethod
    def backward(ctx, grad):
        # Differentiable itself (apply, not _raw), so double backward works.
        return _Apply.apply(grad, ctx.op, not ctx.adjoint), None, None

    @staticmethod
    def jvp(ctx, tangent, _op, _adjoint):
        return _Apply.apply(tangent, ctx.op, ctx.adjoint)

    @staticmethod
    def vmap(info, in_dims, x, op, adjoint):
        # The operator already maps over any leading dims: move the vmapped dim to the front.
        bdim = in_dims[0]
        if bdim is None:
            return _Apply.apply(x, op, adjoint), None
        return _Apply.apply(x.movedim(bdim, 0), op, adjoint), 0


class LinearOperator:
    """A linear map between tensor spaces, used only through ``A(x)`` and ``A.T(y)``.

    Subclasses set ``domain_shape``, ``range_shape``, ``dtype`` and ``device`` and implement
    ``_apply(x)`` / ``_adjoint(y)`` for one batch dimension: ``(n, *domain_shape)`` ->
    ``(n, *range_shape)`` and back.
    """

    domain_shape: tuple[int, ...]
    range_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    # -- to implement -------------------------------------------------------------------
    def _apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- derived ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Matrix shape (m, d) = (prod(range_shape), prod(domain_shape))."""
        return math.prod(self.range_shape), math.prod(self.domain_shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A x for x of shape (*batch, *domain_shape)."""
        return _Apply.apply(x, self, False)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ y for y of shape (*batch, *range_shape)."""
        return _Apply.apply(y, self, True)

    @property
    def T(self) -> LinearOperator:
        return AdjointOperator(self)

    def __matmul__(self, other: LinearOperator) -> LinearOperator:
        return ComposedOperator(self, other)

    def normal(self) -> LinearOperator:
        """The normal operator AᵀA."""
        return self.T @ self

    def __add__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator(self, other)

    def __mul__(self, c: float) -> LinearOperator:
        return ScaledOperator(self, c) if isinstance(c, (int, float)) else NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> LinearOperator:
        return ScaledOperator(self, c, divide=True) if isinstance(c, (int, float)) else NotImplemented

    def as_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (m, d) matrix of the operator, for tiny problems and tests."""
        d = self.shape[1]
        eye = torch.eye(d, dtype=self.dtype, device=self.device).reshape(d, *self.domain_shape)
        cols = self._raw(eye, False).reshape(d, -1)
        return cols.T.contiguous().to(dtype or self.dtype)

    def _raw(self, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """Apply A or Aᵀ to x with arbitrary leading dims, no autograd bookkeeping."""
        in_shape = self.range_shape if adjoint else self.domain_shape
        out_shape = self.domain_shape if adjoint else self.range_shape
        k = len(in_shape)
        if tuple(x.shape[x.ndim - k:]) != tuple(in_shape) or x.ndim < k:
            what = "Aᵀ" if adjoint else "A"
            raise DipuqError(
                f"{type(self).__name__}: {what} expects trailing shape {tuple(in_shape)}, "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        lead = x.shape[: x.ndim - k]
        xb = x.reshape(-1, *in_shape)
        if xb.dtype != self.dtype:
            raise DipuqError(f"{type(self).__name__}: expects dtype {self.dtype}, got {x.dtype}")
        out = self._adjoint(xb) if adjoint else self._apply(xb)
        return out.reshape(*lead, *out_shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.domain_shape} -> {self.range_shape}, {self.dtype})"


class AdjointOperator(LinearOperator):
    """Aᵀ as an operator in its own right; ``A.T.T`` is ``A``."""

    def __init__(self, op: LinearOperator):
        self.op = op
        self.domain_shape, self.range_shape = op.range_shape, op.domain_shape
        self.dtype, self.device = op.dtype, op.device

    def _apply(self, x):
        return self.op._adjoint(x)

    def _adjoint(self, y):
        return self.op._apply(y)

    @property
    def T(self) -> LinearOperator:
        return self.op


class ComposedOperator(LinearOperator):
    """The product ``outer @ inner`` (apply inner first)."""

    def __init__(self, outer: LinearOperator, inner: LinearOperator):
        if tuple(outer.domain_shape) != tuple(inner.range_shape):
            raise DipuqError(
                f"cannot compose: {inner.range_shape} output does not match {outer.domain_shape} input"
            )
        self.outer, self.inner = outer, inner
        self.domain_shape, self.range_shape = inner.domain_shape, outer.range_shape
        self.dtype, self.device = inner.dtype, inner.device

    def _apply(self, x):
        return self.outer._raw(self.inner._raw(x, False), False)

    def _adjoint(self, y):
        return self.inner._raw(self.outer._raw(y, True), True)


class SumOperator(LinearOperator):
    """The sum ``a + b`` of two operators with the same shapes: x -> a(x) + b(x)."""

    def __init__(self, a: LinearOperator, b: LinearOperator):
        if (tuple(a.domain_shape), tuple(a.range_shape)) != (tuple(b.domain_shape), tuple(b.range_shape)):
            raise DipuqError(f"cannot add operators {a.domain_shape} -> {a.range_shape} and "
                             f"{b.domain_shape} -> {b.range_shape}")
        self.a, self.b = a, b
        self.domain_shape, self.range_shape = a.domain_shape, a.range_shape
        self.dtype, self.device = a.dtype, a.device

    def _apply(self, x):
        return self.a._raw(x, False) + self.b._raw(x, False)

    def _adjoint(self, y):
        return self.a._raw(y, True) + self.b._raw(y, True)


class ScaledOperator(LinearOperator):
    """c·A (``c * A``) or A / c (``A / c``) for a real scalar c.

    ``A / c`` divides A's output by c rather than multiplying it by 1/c, so ``(A / c)(x)`` rounds
    exactly like ``A(x) / c``.
    """

    def __init__(self, op: LinearOperator, c: float, divide: bool = False):
        self.op, self.c, self.divide = op, float(c), divide
        self.domain_shape, self.range_shape = op.domain_shape, op.range_shape
        self.dtype, self.device = op.dtype, op.device

    def _scale(self, y):
        return y / self.c if self.divide else self.c * y

    def _apply(self, x):
        return self._scale(self.op._raw(x, False))

    def _adjoint(self, y):
        return self._scale(self.op._raw(y, True))


class DiagonalOperator(LinearOperator):
    """x -> d ⊙ x for a fixed tensor d of shape ``domain_shape`` (self-adjoint)."""

    def __init__(self, d: torch.Tensor):
        self.d = d
        self.domain_shape = self.range_shape = tuple(d.shape)
        self.dtype, self.device = d.dtype, d.device

    def _apply(self, x):
        return x * self.d

    _adjoint = _apply


class IdentityOperator(LinearOperator):
    """x -> x on tensors of shape ``shape`` (returns its input, no copy)."""

    def __init__(self, shape, dtype: torch.dtype = torch.float32, device=None):
        self.domain_shape = self.range_shape = tuple(shape)
        self.dtype, self.device = dtype, torch.device(device or "cpu")

    def _apply(self, x):
        return x

    _adjoint = _apply


class MatrixOperator(LinearOperator):
    """A dense or sparse matrix M (m × d) acting on flattened tensors: x -> M x.

    Sparse matrices are stored as a CSR pair (M and Mᵀ) because CSR × dense is fast on CPU
    in both directions only when each direction has its own row-major copy.
    """

    def __init__(self, matrix: torch.Tensor, domain_shape=None, range_shape=None, matrix_T=None):
        m, d = matrix.shape
        self.domain_shape = tuple(domain_shape) if domain_shape is not None else (d,)
        self.range_shape = tuple(range_shape) if range_shape is not None else (m,)
        if math.prod(self.domain_shape) != d or math.prod(self.range_shape) != m:
            raise DipuqError(f"matrix of shape {(m, d)} does not fit {self.domain_shape} -> {self.range_shape}")
        self.dtype, self.device = matrix.dtype, matrix.device
        self.sparse = matrix.layout != torch.strided
        if self.sparse:
            self.M = matrix.to_sparse_csr()
            self.MT = (matrix_T if matrix_T is not None else matrix.t()).to_sparse_csr()
        else:
            self.M, self.MT = matrix, matrix.T

    def _mul(self, M, x):
        n = x.shape[0]
        xf = x.reshape(n, -1)
        if self.sparse:
            return (M @ xf.T.contiguous()).T
        return xf @ M.T

    def _apply(self, x):
        return self._mul(self.M, x)

    def _adjoint(self, y):
        return self._mul(self.MT, y)

    def as_matrix(self, dtype=None):
        M = self.M.to_dense() if self.sparse else self.M
        return M.to(dtype or self.dtype)


class RowsOperator(LinearOperator):
    """``A`` restricted to some indices ``rows`` of the first axis of its range (projection angles
    for a ray transform, rows for a matrix): ``(R A) x = (A x)[rows]``, adjoint ``Aᵀ`` of the
    zero-filled rows."""

    def __init__(self, op: LinearOperator, rows):
        self.op = op
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=op.device).reshape(-1)
        self.domain_shape = op.domain_shape
        self.range_shape = (int(self.rows.numel()), *op.range_shape[1:])
        self.dtype, self.device = op.dtype, op.device

    def _apply(self, x):
        return self.op._apply(x).reshape(x.shape[0], *self.op.range_shape)[:, self.rows]

    def _adjoint(self, y):
        full = y.new_zeros((y.shape[0], *self.op.range_shape))
        full[:, self.rows] = y
        return self.op._adjoint(full)
