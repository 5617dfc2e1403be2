"""Values checked against type annotations: what a recipe's YAML and `--set` overrides must hold.

`coerce(value, tp, name)` accepts `value` when it fits `tp` (unions, `Literal`, `list[...]`, `dict`, plain
types; an int where a float is wanted, and numeric strings such as '1e-3' that YAML 1.1 reads as text) and
raises a `ConfigError` naming `name` and the type otherwise.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from lmforge.errors import ConfigError


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, name: str) -> Any:
    """`value` checked against the annotation `tp` (int -> float and numeric strings like '1e-3' accepted)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif origin is list:
        if isinstance(value, str):  # one item given on the command line: --set adapter.target_modules=q_proj
            value = [value]
        if isinstance(value, list):
            (item,) = typing.get_args(tp) or (Any,)
            return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
