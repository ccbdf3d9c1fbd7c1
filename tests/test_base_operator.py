"""LinearOperator core: adjoint identities, composition, and torch.autograd / torch.func rules."""

import pytest
import torch
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from dipuq.errors import DipuqError
from dipuq.operators import DiagonalOperator, IdentityOperator, MatrixOperator
from dipuq.testing import check_adjoint

# float64 throughout: these are algebraic identities, so the only error is round-off (~1e-15).
TOL = 1e-10


@pytest.fixture(params=["dense", "sparse"])
def op(request):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 4, generator=g, dtype=torch.float64)
    M[M.abs() < 0.5] = 0  # make it genuinely sparse
    mat = M.to_sparse() if request.param == "sparse" else M
    return MatrixOperator(mat, (2, 2), (3, 2)), M


def test_apply_adjoint_and_dense_oracle(op):
    A, M = op
    x = torch.randn(5, 2, 2, dtype=torch.float64)
    y = torch.randn(5, 3, 2, dtype=torch.float64)
    assert torch.allclose(A(x).reshape(5, 6), x.reshape(5, 4) @ M.T, atol=TOL)
    assert torch.allclose(A.T(y).reshape(5, 4), y.reshape(5, 6) @ M, atol=TOL)
    assert torch.allclose(A.as_matrix(), M) and torch.allclose(A.T.as_matrix(), M.T)
    assert A.T.T is A
    assert torch.allclose(A.normal().as_matrix(), M.T @ M, atol=TOL)


def test_torch_func_rules(op):
    A, M = op
    x = torch.randn(5, 2, 2, dtype=torch.float64)
    out, tangent = jvp(A, (x,), (x,))
    assert torch.allclose(tangent, out, atol=TOL)  # linear: JVP(x; x) = A x
    u = torch.randn_like(out)
    (g,) = vjp(A, x)[1](u)
    assert torch.allclose(g, A.T(u), atol=TOL)
    assert torch.allclose(vmap(A, in_dims=1)(x.transpose(0, 1)), out, atol=TOL)
    assert torch.allclose(jacfwd(A)(x[0]).reshape(6, 4), M, atol=TOL)
    assert torch.allclose(jacrev(A)(x[0]).reshape(6, 4), M, atol=TOL)
    # second order: the Hessian of ½||Ax||² is MᵀM
    H = torch.func.hessian(lambda z: 0.5 * A(z).pow(2).sum())(x[0]).reshape(4, 4)
    assert torch.allclose(H, M.T @ M, atol=TOL)


def test_shape_and_dtype_errors(op):
    A, _ = op
    with pytest.raises(DipuqError, match=r"expects trailing shape \(2, 2\)"):
        A(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(DipuqError, match="dtype"):
        A(torch.zeros(2, 2, dtype=torch.float32))
    with pytest.raises(DipuqError, match="cannot compose"):
        A @ A


def test_sums_scalars_diagonal_and_identity(op):
    A, M = op
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    D, I = DiagonalOperator(d), IdentityOperator((2, 2), torch.float64)
    x = torch.randn(5, 2, 2, generator=gen, dtype=torch.float64)
    # algebra on operators is the same algebra on their dense matrices
    H = A.normal() / 0.7 + 3.0 * I + D
    want = M.T @ M / 0.7 + 3.0 * torch.eye(4, dtype=torch.float64) + torch.diag(d.reshape(-1))
    assert torch.allclose(H.as_matrix(), want, atol=TOL) and torch.allclose(H.T.as_matrix(), want.T, atol=TOL)
    assert check_adjoint(2.5 * A) < TOL and check_adjoint(A / 3.0 + A) < TOL
    # bit for bit the expression it stands for: the parts run in the order written, A / c divides
    assert torch.equal(H(x), A.T(A(x)) / 0.7 + 3.0 * x + x * d)
    assert torch.equal((A / 0.3)(x), A(x) / 0.3)
    with pytest.raises(DipuqError, match="cannot add"):
        A + D
    with pytest.raises(TypeError):
        A * x
