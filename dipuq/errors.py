"""User-facing errors: one clear line, no traceback in the CLI (unless --debug)."""

__all__ = ["DipuqError", "GPUUnavailableError", "DataError", "ConfigError", "DivergenceError",
           "GPUOutOfMemoryError"]


class DipuqError(ValueError):
    """Bad input or an unusable request; the message is one line a user can act on."""


class GPUUnavailableError(DipuqError, RuntimeError):
    """A CUDA path was requested on a machine without a usable CUDA device."""


class DataError(DipuqError):
    """Malformed, inconsistent or corrupt scan data (shapes, NaN/inf, flat <= dark, hashes)."""


class ConfigError(DipuqError):
    """Invalid configuration: unknown keys, wrong types or out-of-range values."""


class DivergenceError(DipuqError, RuntimeError):
    """An iterative solver diverged (NaN or exploding objective)."""


class GPUOutOfMemoryError(DipuqError, RuntimeError):
    """The GPU ran out of memory; the message names the failed size and the config key that lowers it."""
