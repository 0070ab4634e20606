"""One small generic registry: name -> factory, aliases, did-you-mean, entry-point plugins.

The built-in names of the method, task and model registries are also listed here
(`BUILTIN_NAMES`), so that the command line can check a name before importing torch and the
modules that register them (`check_name`); `Registry.register` keeps the list honest.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from ptqbench.errors import UnknownNameError

T = TypeVar("T")
log = logging.getLogger(__name__)

# kind -> built-in name -> its aliases; must match the `register` calls under ptqbench/.
BUILTIN_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "method": {
        "fp": (), "minmax": (), "minmax-avg": ("avgminmax",), "percentile": (), "mse": (), "omse": (),
        "qdrop": (), "brecq": (), "brecq-fisher": (), "ptq4sam-s": (), "ptq4sam": ("ptq4sam-l",),
        "saqsam-s": ("saq-sam-s",), "saqsam": ("saq-sam",),
    },
    "task": {"coco": (), "dota": (), "ade20k": ()},
    "model": {"sam_tiny": ("tiny",), "sam_vit_b": ("vit_b",), "sam_vit_l": ("vit_l",), "sam_vit_h": ("vit_h",)},
}
# kind -> the entry-point group through which installed packages add entries of that kind.
ENTRY_POINT_GROUPS = {"method": "ptqbench.methods"}
_LIVE: dict[str, Registry] = {}  # kind -> its registry, once the module defining it is imported


def _unknown(kind: str, name: str, key: str, aliases: dict[str, str], names: list[str]) -> UnknownNameError:
    """The error for an unknown `name` (normalised to `key`), with the closest valid name."""
    close = difflib.get_close_matches(key, names + list(aliases), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(sorted(names))}")


def check_name(kind: str, name: str) -> str:
    """The canonical form of `name`, checked without importing the modules that register it.

    Uses the live registry once it exists (it knows plugins and names added at run time),
    else `BUILTIN_NAMES`. A name that is not built in passes unchanged when plugins of its
    kind are installed (the registry decides after loading them); otherwise UnknownNameError.
    """
    if kind in _LIVE:
        return _LIVE[kind].canonical(name)
    builtin = BUILTIN_NAMES[kind]
    aliases = {alias: target for target, names in builtin.items() for alias in names}
    key = name.strip().lower()
    key = aliases.get(key, key)
    if key in builtin:
        return key
    group = ENTRY_POINT_GROUPS.get(kind)
    if group is not None and entry_points(group=group):
        return name
    raise _unknown(kind, name, key, aliases, list(builtin))


def summary(factory: Callable) -> str:
    """The sentences on the first line of a factory's docstring (a sentence it starts there
    is completed from the next lines), on one line; '' without a docstring."""
    first, *rest = (factory.__doc__ or "").strip().split("\n\n")[0].splitlines() or [""]
    first = first.strip()
    if first.endswith(".") or not rest:
        return first
    if ". " in first:
        return first[:first.rindex(". ") + 1]
    text = " ".join([first] + [line.strip() for line in rest])
    end = text.find(".", len(first))
    return text if end < 0 else text[:end + 1]


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
        _LIVE[kind] = self

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering `factory` under `name` (and `aliases`)."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            builtin = BUILTIN_NAMES.get(self.kind)
            if builtin is not None and factory.__module__.startswith("ptqbench.") and builtin.get(name) != aliases:
                raise ValueError(f"built-in {self.kind} {name!r} (aliases {aliases}) is not listed as such "
                                 "in ptqbench.registry.BUILTIN_NAMES")
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
        raise _unknown(self.kind, name, key, self._aliases, list(self._factories))

    def describe(self, name: str) -> str:
        """One line about `name`: the summary of its factory's docstring."""
        return summary(self.get(name))

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under `name` (or one of its aliases)."""
        return self._factories[self.canonical(name)]
