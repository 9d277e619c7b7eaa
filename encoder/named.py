"""Things by name, registered by the modules that define them: encoders and face detectors.

A ``Registry`` holds the entries its modules register (``add``) and imports those
modules on the first lookup, once, under a lock, so that naming a model never needs
an import of its module first.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class _Entry(Protocol):
    build: Callable[..., object]


E = TypeVar("E", bound=_Entry)


class Registry(Generic[E]):
    """Entries by name. ``kind`` names them in errors ("encoder"), ``label`` in the unknown-name
    error ("face detector"); ``unknown`` is the error type for a name nobody registered."""

    def __init__(self, kind: str, modules: tuple[str, ...], unknown: type[Exception],
                 label: str | None = None) -> None:
        self.kind = kind
        self.label = label or kind
        self.modules = modules
        self.unknown = unknown
        self._entries: dict[str, E] = {}
        self._loaded = False
        self._lock = threading.Lock()

    def add(self, name: str, entry: E) -> None:
        """Register ``entry``; a second, different builder under one name is a ValueError."""
        if name in self._entries and self._entries[name].build is not entry.build:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> E:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise self.unknown(f"unknown {self.label} {name!r}; known {self.kind}s: "
                               f"{known}") from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._entries)

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                for module in self.modules:
                    try:
                        importlib.import_module(module)
                    except ModuleNotFoundError as exc:  # an optional model whose code is absent
                        if exc.name != module:
                            raise
                self._loaded = True
