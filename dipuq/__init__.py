"""dipuq: CT reconstruction with error bars (linearised deep image prior)."""

__version__ = "0.1.0"
