"""The base of every config dataclass: its own checks in one place, and a freeze after resolution.

A run's config goes through three stages: composed (Hydra and the command line), resolved (every
``auto`` settled by :mod:`kdlib.config.resolve`, with its reason), then frozen and written to the
run directory as ``config.yaml``. Freezing is what makes that file exactly what ran: afterwards any
attribute write on any node raises :class:`~kdlib.errors.FrozenConfigError`, and lists and dicts
inside become tuples and read-only dicts. Each config class states its own value rules in
:meth:`ConfigNode.check` (pure: it reads, never writes); :func:`kdlib.config.checks.validate` walks
the tree and calls them, naming the key of the node that failed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Union

from kdlib.errors import FrozenConfigError

# The value of a setting that the machine or the rest of the config decides (see config/resolve.py).
AUTO = "auto"
# A switch that is true, false or auto. OmegaConf 2.3 cannot type `bool | Literal["auto"]`, so the
# field holds a bool or a string and its class's check() admits only "auto" as the string.
BoolOrAuto = Union[bool, str]

FROZEN_ATTRIBUTE = _FROZEN = "_kdlib_frozen_"


class ConfigNode:
    """Mixin of every kdlib config dataclass."""

    def check(self) -> None:
        """Raise ValueError for a value the field's type allows but the option does not. The
        message starts with the field's name (``"lr must be positive, got 0"``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get(_FROZEN, False):
            raise FrozenConfigError(
                f"{type(self).__name__}.{name}: the run's config is frozen once resolved (config.yaml is "
                "what runs); change the config before kdlib.run, not during it"
            )
        object.__setattr__(self, name, value)


class FrozenDict(dict):
    """A dict that refuses writes (and still pickles, for Ray)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise FrozenConfigError("the run's config is frozen once resolved; this mapping cannot change")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


def is_frozen(node: Any) -> bool:
    return bool(getattr(node, "__dict__", {}).get(_FROZEN, False))


def freeze(node: Any) -> Any:
    """Freeze ``node`` and every config node, list and dict under it, in place; returns it."""
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return node
    for f in dataclasses.fields(node):
        object.__setattr__(node, f.name, _frozen_value(getattr(node, f.name)))
    object.__setattr__(node, _FROZEN, True)
    return node


def _frozen_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return freeze(value)
    if isinstance(value, (list, tuple)):
        return tuple(_frozen_value(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict({k: _frozen_value(v) for k, v in value.items()})
    return value


def thawed(node: Any) -> Any:
    """A plain (unfrozen) deep copy of a config: tuples back to lists, read-only dicts to dicts."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        copy = object.__new__(type(node))
        for f in dataclasses.fields(node):
            object.__setattr__(copy, f.name, thawed(getattr(node, f.name)))
        return copy
    if isinstance(node, (list, tuple)):
        return [thawed(v) for v in node]
    if isinstance(node, dict):
        return {k: thawed(v) for k, v in node.items()}
    return node


def nodes(root: Any, path: str = "") -> Iterator[tuple[str, ConfigNode]]:
    """Every config node under ``root`` (itself first) with its dotted key, depth first."""
    if isinstance(root, ConfigNode):
        yield path, root
    if not dataclasses.is_dataclass(root) or isinstance(root, type):
        return
    for f in dataclasses.fields(root):
        value = getattr(root, f.name)
        key = f"{path}.{f.name}" if path else f.name
        if isinstance(value, dict):
            for name, item in value.items():
                yield from nodes(item, f"{key}.{name}")
        else:
            yield from nodes(value, key)


def check_bool_or_auto(value: Any, name: str) -> None:
    """The rule of a :data:`BoolOrAuto` field."""
    if value is not True and value is not False and value != AUTO:
        raise ValueError(f"{name}: expected true, false or auto, got {value!r}")
