"""Config machinery shared by every subsystem's frozen dataclass: type-checked overrides, typed values read from text
(regularizer settings, --set), and configs as plain dicts."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar

from robust_enc.errors import UserError

C = TypeVar("C")


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def replace_checked(config: C, **overrides: Any) -> C:
    """dataclasses.replace that refuses unknown fields and values of the wrong type (an override keeps the type)."""
    hints = typing.get_type_hints(type(config))
    for key, value in overrides.items():
        if key not in hints:
            raise UserError(f"{type(config).__name__} has no setting {key!r}; known: {', '.join(hints)}")
        if not _matches(value, hints[key]):
            raise UserError(f"setting {key}={value!r} must be {hints[key]}")
        if isinstance(value, list):
            overrides[key] = tuple(value)
        elif hints[key] is float and isinstance(value, int):
            overrides[key] = float(value)
    return dataclasses.replace(config, **overrides)  # type: ignore[type-var]


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_value(text: str, annotation: Any) -> Any:
    """Parse ``text`` as ``annotation`` (bool, int, float, str, None, Literal[...] or a union of them): the one reader
    of typed values given as text (regularizer settings, ``--set KEY=VALUE``); ValueError saying what was expected."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if text in typing.get_args(annotation):
            return text
        choices = typing.get_args(annotation)
        raise ValueError(str(choices[0]) if len(choices) == 1 else f"one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        if type(None) in typing.get_args(annotation) and text.lower() in ("null", "none"):
            return None
        wanted = []
        for member in typing.get_args(annotation):
            try:
                return parse_value(text, member)
            except ValueError as err:
                wanted.append(str(err))
        raise ValueError(" or ".join(wanted))
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError("true or false")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("an integer") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("a number") from None
        if not math.isfinite(value):
            raise ValueError("a finite number")
        return value
    if annotation is str:
        return text
    if annotation is type(None):
        raise ValueError("null")
    raise TypeError(f"unsupported value type {annotation!r}")
