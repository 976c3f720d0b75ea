"""Config machinery shared by every subsystem's frozen dataclass: type-checked overrides and JSON round trips."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

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

