"""Name -> class registries for each component family, with errors that list the known names."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A family of interchangeable components (encoders, connectors, LLMs).

    Adding a kind is one decorated class: ``@CONNECTORS.register("mlp")``.
    """

    def __init__(self, family: str, key: str):
        self.family = family  # e.g. "connector"
        self.key = key  # the config key that names a member, e.g. "model.connector.kind"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"{self.key}: unknown {self.family} {name!r} (known: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
