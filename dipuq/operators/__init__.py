from dipuq.operators.base import AdjointOperator, ComposedOperator, LinearOperator, MatrixOperator

__all__ = ["LinearOperator", "MatrixOperator", "ComposedOperator", "AdjointOperator"]
