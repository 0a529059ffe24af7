"""One small generic registry: name or type -> object, with a clear error on a miss."""
from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[Hashable, T] = {}

    def register(self, key: Hashable, item: T | None = None) -> Any:
        """`reg.register("name", obj)` or as a decorator `@reg.register("name")`."""
        if item is not None:
            self._add(key, item)
            return item

        def deco(obj: T) -> T:
            self._add(key, obj)
            return obj

        return deco

    def _add(self, key: Hashable, item: T) -> None:
        if key in self._items and self._items[key] is not item:
            raise ConfigError(f"{self.kind} {key!r} is registered twice")
        self._items[key] = item

    def get(self, key: Hashable) -> T:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(map(_name, self._items))) or "none"
            raise ConfigError(
                f"unknown {self.kind} {_name(key)!r}", hint=f"known {self.kind}s: {known}"
            ) from None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._items)

    def items(self):
        return self._items.items()

    def names(self) -> list[str]:
        return sorted(map(_name, self._items))


def _name(key: Hashable) -> str:
    return key.__name__ if isinstance(key, type) else str(key)


Factory = Callable[..., Any]
