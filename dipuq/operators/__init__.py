"""Linear operators and CT ray transforms on torch tensors (see :mod:`dipuq.operators.ray`), the
reference reconstructions (:mod:`dipuq.operators.recon`) and simulated scans (:mod:`dipuq.operators.simulate`)."""

from dipuq.operators import recon
from dipuq.operators.base import (
    AdjointOperator, ComposedOperator, DiagonalOperator, IdentityOperator, LinearOperator, MatrixOperator, ScaledOperator,
    SumOperator,
)
from dipuq.operators.ray import RayTransform, available_backends, cuda_available
from dipuq.operators.recon import analytic, cgls, fbp, fdk, sirt
from dipuq.operators.simulate import simulate_scan

__all__ = [
    "LinearOperator",
    "MatrixOperator",
    "ComposedOperator",
    "AdjointOperator",
    "SumOperator",
    "ScaledOperator",
    "DiagonalOperator",
    "IdentityOperator",
    "RayTransform",
    "cuda_available",
    "available_backends",
    "recon",
    "fbp",
    "fdk",
    "sirt",
    "cgls",
    "analytic",
    "simulate_scan",
]
