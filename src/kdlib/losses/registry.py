"""The loss registry: divergence functions by name, each with a typed parameter config.

A divergence is a function ``(student_logits [N, V], teacher_logits [N, V], **params) -> [N]``
that returns one loss per token. It receives float32 logits already divided by the temperature
(the caller applies temperature, T^2 scaling and vocabulary masking once for every divergence), so
a registered function implements only its formula. Its keyword-only parameters with defaults and
type annotations become a config dataclass (a subclass of :class:`kdlib.config.LossConfig`), which
makes ``loss=my_loss loss.alpha=0.2`` typed on the command line without any YAML.
"""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import field, make_dataclass
from typing import Any, Callable

from kdlib.config.schema import LossConfig
from kdlib.registry import Registry

Divergence = Callable[..., Any]

LOSSES: Registry[Divergence] = Registry("loss")

_ALLOWED_PARAM_TYPES = (int, float, bool, str)


def register_loss(name: str, *, config: type[LossConfig] | None = None) -> Callable[[Divergence], Divergence]:
    """Decorator registering a per-token divergence under ``name``.

    The function's keyword-only parameters (``*, alpha: float = 0.5``) are its tunable
    parameters. Pass ``config=`` to give a hand-written :class:`LossConfig` subclass instead.
    """

    def decorate(fn: Divergence) -> Divergence:
        cfg_cls = config if config is not None else _config_from_signature(name, fn)
        if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, LossConfig)):
            raise TypeError(f"loss {name!r}: config must be a subclass of kdlib.config.LossConfig")
        LOSSES.register(name, fn, config=cfg_cls)
        return fn

    return decorate


def loss_params(cfg: LossConfig) -> dict[str, Any]:
    """The divergence-specific parameters of a loss config (what the function takes as kwargs)."""
    base = {f for f in LossConfig.__dataclass_fields__}
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in base}


def _config_from_signature(name: str, fn: Divergence) -> type[LossConfig]:
    """Build ``<Name>LossConfig(LossConfig)`` from the function's keyword-only parameters."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) != 2:
        raise TypeError(
            f"loss {name!r} must take exactly two positional arguments "
            f"(student_logits, teacher_logits), got {[p.name for p in positional]}"
        )
    reserved = set(LossConfig.__dataclass_fields__)
    fields = []
    for p in sig.parameters.values():
        if p.kind is not p.KEYWORD_ONLY:
            continue
        if p.name in reserved:
            raise TypeError(
                f"loss {name!r}: parameter {p.name!r} is reserved (kdlib applies it for every loss)"
            )
        if p.default is p.empty:
            raise TypeError(f"loss {name!r}: keyword-only parameter {p.name!r} needs a default")
        typ = hints.get(p.name, type(p.default))
        if typ not in _ALLOWED_PARAM_TYPES:
            raise TypeError(
                f"loss {name!r}: parameter {p.name!r} must be annotated int, float, bool or str"
            )
        fields.append((p.name, typ, field(default=p.default)))
    fields.append(("name", str, field(default=name)))
    cls_name = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) + "LossConfig"
    cls = make_dataclass(cls_name, fields, bases=(LossConfig,))
    cls.__module__ = __name__
    # Importable by name, so configs pickle by reference (Ray actors receive them).
    setattr(sys.modules[__name__], cls_name, cls)
    return cls
