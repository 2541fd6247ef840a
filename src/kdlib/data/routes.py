"""Which teacher scores each row: the route column, the default route, an ensemble's weights.

``routing.key`` names a column whose value is a teacher (``teacher`` or a key of ``teachers``), an
ensemble (a key of ``routing.ensembles``) or a value ``routing.map`` maps to one; a row without it
takes ``routing.default`` or, when that is null, is an error. An ensemble's weights are its fixed ``weights`` (equal when not given)
or, with ``weights_key``, the row's own: ``{member: weight}`` (members left out weigh 0) or a list
in the members' order; they are normalised to sum 1. Every problem is one line naming the file and
the row, and :func:`check_routes` finds them all at preflight, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from kdlib.config.teachers import EnsembleConfig, check_weights, named_teachers, several_teachers
from kdlib.data.sources import load_rows
from kdlib.errors import DataError


@dataclass(frozen=True)
class Router:
    """Reads the route of a row for one config."""

    key: Optional[str]
    default: Optional[str]
    teachers: tuple[str, ...]
    ensembles: Mapping[str, EnsembleConfig]
    # Column values standing for a target (routing.map).
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Any) -> "Router":
        routing = cfg.routing
        return cls(routing.key, routing.default, tuple(named_teachers(cfg)), dict(routing.ensembles), dict(routing.map))

    @property
    def targets(self) -> tuple[str, ...]:
        return (*self.teachers, *self.ensembles)

    def members(self, target: str) -> tuple[str, ...]:
        ensemble = self.ensembles.get(target)
        return (target,) if ensemble is None else tuple(ensemble.members)

    def route(self, row: Mapping[str, Any], where: str) -> tuple[str, Optional[tuple[float, ...]]]:
        """(target, the members' weights or None for a single teacher) of one raw row."""
        value = row.get(self.key) if self.key else None
        if value is None or value == "":
            if self.default is None:
                raise DataError(f"{where}: no {self.key!r}, so no teacher (routing.default=null); give the row a "
                                f"{self.key!r} or set routing.default")
            target = self.default
        elif not isinstance(value, str):
            raise DataError(f"{where}: {self.key!r} must name a teacher or ensemble, got {type(value).__name__}")
        elif value in self.aliases:
            target = self.aliases[value]
        elif value not in self.targets:
            mapped = f" or a value of routing.map ({', '.join(self.aliases)})" if self.aliases else ""
            raise DataError(f"{where}: {self.key}={value!r} names no teacher or ensemble; choose one of: "
                            f"{', '.join(self.targets)}{mapped}")
        else:
            target = value
        return target, self.weights(target, row, where)

    def weights(self, target: str, row: Mapping[str, Any], where: str) -> Optional[tuple[float, ...]]:
        ensemble = self.ensembles.get(target)
        if ensemble is None:
            return None
        members = list(ensemble.members)
        column = ensemble.weights_key
        value = row.get(column) if column else None
        if value is None:
            given = list(ensemble.weights) if ensemble.weights is not None else [1.0] * len(members)
            return tuple(check_weights(given, members))
        if isinstance(value, Mapping):
            unknown = [name for name in value if name not in members]
            if unknown:
                raise DataError(f"{where}: {column!r} weighs {unknown[0]!r}, which is not a member of ensemble "
                                f"{target} ({', '.join(members)})")
            value = [0.0 if value.get(m) is None else value.get(m) for m in members]
        elif not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: {column!r} must be {{member: weight}} or a list of {len(members)} weights, "
                            f"got {type(value).__name__}")
        try:
            return tuple(check_weights(list(value), members))
        except ValueError as exc:
            raise DataError(f"{where}: {column!r} of ensemble {target}: {exc}") from None


def check_routes(cfg: Any) -> dict[str, int]:
    """Preflight of a routed run: every row of data.train and data.eval has a known route and valid
    weights (DataError naming file and row otherwise); returns the rows per target."""
    counts: dict[str, int] = {}
    if not several_teachers(cfg):
        return counts
    router = Router.of(cfg)
    data = cfg.data
    specs = [("data.train", data.train, data.train_split, data.max_samples)]
    if data.eval:
        specs.append(("data.eval", data.eval, data.eval_split, data.eval_max_samples))
    for key, spec, split, max_rows in specs:
        source = load_rows(spec, split=split, key=key, max_rows=max_rows)
        for i, row in enumerate(source.rows):
            target, _ = router.route(row, f"{key}: {source.where(i)}")
            counts[target] = counts.get(target, 0) + 1
    return counts
