"""One small generic registry: name -> factory, aliases, did-you-mean, entry-point plugins."""

from __future__ import annotations

import difflib
import logging
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from ptqbench.errors import UnknownNameError

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """Maps names to factories.

    `kind` names the things registered ("method", "task", "model") in error messages.
    `entry_point_group`, when given, lets installed third-party packages register more
    entries: each entry point is loaded (imported) on first lookup; importing it is expected
    to call `register` on this registry.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._aliases: dict[str, str] = {}
        self._entry_point_group = entry_point_group
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering `factory` under `name` (and `aliases`)."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            for alias in aliases:
                self._aliases[alias] = name
            return factory

        return decorator

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for entry in entry_points(group=self._entry_point_group):
            log.info("loading %s plugin %s", self.kind, entry.value)
            entry.load()

    def names(self) -> list[str]:
        """The registered names, sorted (aliases excluded)."""
        self._load_plugins()
        return sorted(self._factories)

    def canonical(self, name: str) -> str:
        """Resolve an alias; raise UnknownNameError with a suggestion for an unknown name."""
        self._load_plugins()
        key = name.strip().lower()
        key = self._aliases.get(key, key)
        if key in self._factories:
            return key
        candidates = list(self._factories) + list(self._aliases)
        close = difflib.get_close_matches(key, candidates, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(self.names())}"
        )

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under `name` (or one of its aliases)."""
        return self._factories[self.canonical(name)]
