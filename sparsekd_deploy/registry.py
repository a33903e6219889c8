"""One small registry for every plug-in kind (patterns, importance criteria, operators, losses, targets...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import SparseKDError

T = TypeVar("T")


class UnknownNameError(SparseKDError):
    pass


class Registry(Generic[T]):
    """Maps names to factories. Registering a name twice raises; a failed lookup lists what exists."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def split_spec(spec: str) -> tuple[str, str | None]:
    """'power:2' -> ('power', '2'); 'magnitude' -> ('magnitude', None)."""
    name, sep, arg = spec.partition(":")
    return name.strip(), (arg.strip() if sep else None)
