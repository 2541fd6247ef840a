"""Name -> implementation registries, the one extension mechanism of kdlib.

Losses, algorithms, teacher and rollout backends, transports, launchers and controller loops are
all chosen by name from the config. Each kind has one :class:`Registry`: a plain dict plus a
decorator. An entry may carry a typed config dataclass (its parameters, settable from the command
line) and may be registered lazily as a ``"module:attr"`` string, so heavy backends (GPU inference engines, Ray)
are imported only when selected. An entry may also carry ``info``: static facts about it (a teacher
backend's capabilities) that configuration checks read without importing the implementation. An
unknown name fails with the sorted list of known names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A registry lookup with a name nobody registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want the plain sentence.
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation: its name, the object (or a lazy path), its config type and
    static facts about it."""

    name: str
    target: T | str
    config_cls: type | None = None
    info: Any = None

    def load(self) -> T:
        """The implementation, importing it first if it was registered as ``"module:attr"``."""
        if isinstance(self.target, str):
            module_name, _, attr = self.target.partition(":")
            return getattr(importlib.import_module(module_name), attr)
        return self.target


class Registry(Generic[T]):
    """A named collection of implementations of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, target: T | str | None = None, *, config: type | None = None, info: Any = None
    ) -> Callable[[T], T] | T | str:
        """Register ``target`` under ``name``; without ``target`` this is a decorator.

        Registering the same name twice with a different target is an error, so two plugins cannot
        silently shadow each other; registering the identical object again is a no-op (module
        reloads in notebooks).
        """
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r} must be a non-empty identifier")

        def add(obj: T | str) -> T | str:
            old = self._entries.get(name)
            if old is not None and old.target is not obj and _qualname(old.target) != _qualname(obj):
                raise ValueError(
                    f"{self.kind} {name!r} is already registered ({_qualname(old.target)}); "
                    f"choose another name"
                )
            self._entries[name] = Entry(name, obj, config, info)
            return obj

        if target is None:
            return add
        return add(target)

    def class_decorator(self, name: str, base: type, config: type, config_base: type, public: str) -> Callable[[T], T]:
        """A decorator registering a subclass of ``base`` under ``name`` with ``config`` (a subclass
        of ``config_base``) as its typed options; ``public`` is where users find ``base`` (named in
        the error), e.g. ``kdlib.algorithms``."""

        def decorate(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"{self.kind} {name!r} must subclass {public}.{base.__name__}")
            if not (isinstance(config, type) and issubclass(config, config_base)):
                raise TypeError(f"{self.kind} {name!r}: config must subclass {config_base.__name__}")
            self.register(name, cls, config=config)
            return cls

        return decorate

    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name``; an unknown name lists the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names()) or '(none)'}"
            ) from None

    def get(self, name: str) -> T:
        """The implementation registered under ``name`` (imported now if it was lazy)."""
        return self.entry(name).load()

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _qualname(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
