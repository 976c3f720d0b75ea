"""One small generic registry, used for every concept: models, datasets, regularizers, attacks.

Names are the exact strings used in configs, CLI flags and result rows. A name may carry an argument after a colon
(``timm:resnet26d``, ``folder:/data/imgs``) when its entry was registered with ``takes_argument=True``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from robust_enc.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    help: str = ""
    takes_argument: bool = False  # "name:ARG" forms, e.g. timm:<model>, folder:<path>
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    def __init__(self, concept: str) -> None:
        self.concept = concept  # "model", "dataset", ... used in error messages
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, *, help: str = "", takes_argument: bool = False, **meta: Any
    ) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("resnet20", help=...)``. A duplicate name raises."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"duplicate {self.concept} name {name!r}")
            self._entries[name] = Entry(name, obj, help, takes_argument, dict(meta))
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        for name in self.names():
            yield self._entries[name]

    def __contains__(self, name: str) -> bool:
        try:
            self.lookup(name)
        except UserError:
            return False
        return True

    def lookup(self, name: str) -> tuple[Entry[T], str | None]:
        """Return (entry, argument). Unknown names raise a UserError listing the known names and a did-you-mean."""
        key, sep, argument = name.partition(":")
        entry = self._entries.get(name) or self._entries.get(key)
        if entry is not None:
            if not entry.takes_argument and entry.name == name:
                return entry, None
            if entry.takes_argument:
                argument = argument or entry.meta.get("default_argument", "")
                if not argument:
                    raise UserError(f"{self.concept} {key!r} needs an argument: use {key}:<value>")
                return entry, argument
        known = [e.name + (":<arg>" if e.takes_argument else "") for e in self.entries()]
        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown {self.concept} {name!r}.{hint} Known: {', '.join(known)}")

    def get(self, name: str) -> T:
        return self.lookup(name)[0].obj
