"""One small generic registry: name -> factory, aliases, did-you-mean, entry-point plugins.

The built-in entries of the method, task and model registries are listed here (`BUILTINS`: each
name with its aliases and the module whose import registers it). Registration is lazy: a registry
knows its built-in names and aliases from the start and imports a built-in's module on the first
`get` of it, so importing an interface (`ptqbench.tasks.base`) imports no task, torch or
segment_anything. The command line checks a name against the table before importing torch
(`check_name`); `Registry.register` keeps the table honest.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, NamedTuple, TypeVar

from ptqbench.errors import UnknownNameError

T = TypeVar("T")
log = logging.getLogger(__name__)


class Builtin(NamedTuple):
    """A built-in entry: the module whose import registers it, and its aliases."""

    module: str
    aliases: tuple[str, ...] = ()


_M, _T = "ptqbench.methods.", "ptqbench.tasks."
# kind -> built-in name -> its entry; must match the `register` calls under ptqbench/.
BUILTINS: dict[str, dict[str, Builtin]] = {
    "method": {
        "fp": Builtin(_M + "fp"),
        "minmax": Builtin(_M + "minmax"),
        "minmax-avg": Builtin(_M + "minmax", ("avgminmax",)),
        "percentile": Builtin(_M + "percentile"),
        "mse": Builtin(_M + "mse"),
        "omse": Builtin(_M + "mse"),
        "qdrop": Builtin(_M + "qdrop"),
        "brecq": Builtin(_M + "brecq"),
        "brecq-fisher": Builtin(_M + "brecq"),
        "ptq4sam-s": Builtin(_M + "ptq4sam.method"),
        "ptq4sam": Builtin(_M + "ptq4sam.method", ("ptq4sam-l",)),
        "saqsam-s": Builtin(_M + "saqsam.method", ("saq-sam-s",)),
        "saqsam": Builtin(_M + "saqsam.method", ("saq-sam",)),
    },
    "task": {"coco": Builtin(_T + "coco"), "dota": Builtin(_T + "dota"), "ade20k": Builtin(_T + "ade20k")},
    "model": {
        "sam_tiny": Builtin("ptqbench.models.sam1.models", ("tiny",)),
        "sam_vit_b": Builtin("ptqbench.models.sam1.models", ("vit_b",)),
        "sam_vit_l": Builtin("ptqbench.models.sam1.models", ("vit_l",)),
        "sam_vit_h": Builtin("ptqbench.models.sam1.models", ("vit_h",)),
    },
}
# kind -> built-in name -> its aliases (derived from BUILTINS).
BUILTIN_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    kind: {name: entry.aliases for name, entry in entries.items()} for kind, entries in BUILTINS.items()}
# kind -> the entry-point group through which installed packages add entries of that kind.
ENTRY_POINT_GROUPS = {"method": "ptqbench.methods", "task": "ptqbench.tasks"}
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

    `kind` names the things registered ("method", "task", "model") in error messages. The
    built-in entries of that kind (`BUILTINS`) are known by name and alias from the start; the
    module that registers one is imported on its first `get`.
    `entry_point_group`, when given, lets installed third-party packages register more
    entries: each entry point is loaded (imported) on first lookup; importing it is expected
    to call `register` on this registry.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        builtins = BUILTINS.get(kind, {})
        self._builtins: dict[str, str] = {name: entry.module for name, entry in builtins.items()}
        self._aliases: dict[str, str] = {alias: name for name, entry in builtins.items() for alias in entry.aliases}
        self._entry_point_group = entry_point_group
        self._plugins_loaded = entry_point_group is None
        _LIVE[kind] = self

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering `factory` under `name` (and `aliases`)."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            module = self._builtins.get(name)
            if name in self._factories or name in self._aliases or (
                    module is not None and factory.__module__ != module):
                raise ValueError(f"{self.kind} {name!r} is already registered")
            builtin = BUILTIN_NAMES.get(self.kind)
            if builtin is not None and factory.__module__.startswith("ptqbench.") and (
                    builtin.get(name) != aliases or module != factory.__module__):
                raise ValueError(f"built-in {self.kind} {name!r} (aliases {aliases}, module {factory.__module__}) "
                                 "is not listed as such in ptqbench.registry.BUILTINS")
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

    def _known(self) -> list[str]:
        """Every name: the registered ones and the built-ins not imported yet."""
        return list(self._factories) + [name for name in self._builtins if name not in self._factories]

    def names(self) -> list[str]:
        """The registered names, built-ins included whether imported yet or not, sorted (aliases excluded)."""
        self._load_plugins()
        return sorted(self._known())

    def canonical(self, name: str) -> str:
        """Resolve an alias; raise UnknownNameError with a suggestion for an unknown name."""
        self._load_plugins()
        key = name.strip().lower()
        key = self._aliases.get(key, key)
        if key in self._factories or key in self._builtins:
            return key
        raise _unknown(self.kind, name, key, self._aliases, self._known())

    def describe(self, name: str) -> str:
        """One line about `name`: the summary of its factory's docstring."""
        return summary(self.get(name))

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under `name` (or one of its aliases); a built-in's module is
        imported here, on its first `get`."""
        key = self.canonical(name)
        if key not in self._factories:
            importlib.import_module(self._builtins[key])
            if key not in self._factories:
                raise LookupError(f"built-in {self.kind} {key!r}: importing {self._builtins[key]} did not register it")
        return self._factories[key]
