"""One config value checked against its type hint and range, with one-line errors.

:func:`coerce` checks a value (and, when it came from command-line text, parses it) against a
dataclass field's type hint — ``int``, ``float`` (finite), ``bool``, ``str``, ``Literal[...]``,
``list[...]`` / ``tuple[...]`` and unions with ``None`` — and :func:`check_range` against the
field's ``ge`` / ``gt`` / ``le`` / ``lt`` bounds (see :func:`dipuq.run.config.option`). Every
failure is one :class:`~dipuq.errors.ConfigError` line naming the key; :func:`suggest` adds a
"did you mean" for misspelt names.

Example::

    >>> coerce("1_000", int, "dip.iterations", text=True)
    1000
    >>> coerce("fast", Literal["vmap", "loop"], "linearise.batching", text=True)
    Traceback (most recent call last):
    ...
    dipuq.errors.ConfigError: linearise.batching must be one of 'vmap', 'loop', got 'fast' (valid: vmap, loop)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from dipuq.errors import ConfigError

__all__ = ["coerce", "check_range", "suggest"]


def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(options)})"


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "none"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, hint, where: str, text: bool):
    """``value`` checked (and, when it came from command-line text, parsed) against ``hint``."""
    origin = typing.get_origin(hint)
    bad = ConfigError(f"{where} must be {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}"
                              + (suggest(value, [str(c) for c in choices]) if isinstance(value, str) else ""))
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (text and isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where, text)
            except ConfigError:
                pass
        raise bad
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if text and isinstance(value, str):
            s = value.strip().strip("[]()")
            value = [v.strip() for v in s.split(",") if v.strip()] if s else []
        if not isinstance(value, (list, tuple)):
            raise bad
        out = [coerce(v, item, f"{where}[{i}]", text) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if hint is bool:
        if text and isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if text and isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer() and not text:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if hint is Any:
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise bad
    return value


def check_range(value, f: dataclasses.Field, where: str) -> None:
    m = f.metadata
    checks = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for key, ok, sym in checks:
        bound = m.get(key)
        if bound is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value, bound):
            raise ConfigError(f"{where} must be {sym} {bound:g}, got {value!r}")
