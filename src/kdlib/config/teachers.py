"""Several teachers in one run: how samples are routed to the named teachers, and their ensembles.

``teacher`` stays the run's teacher (named ``teacher`` here); ``teachers.<name>`` adds named
teachers, each a whole :class:`~kdlib.config.models.TeacherConfig` (model, backend and options,
dtype, tokenizer, cache), composed from the ``teacher`` group the Hydra way
(``+teacher@teachers.coder=smollm2 teachers.coder.dtype=float32``). This section says which
teacher scores each sample: a data column names a teacher or an ensemble per sample
(``routing.key``), samples without one go to ``routing.default``. An ensemble's target is a
weighted combination of its members' next-token distributions on the student's tokens
(docs/multi_teacher.md has the formulas). Nothing here matters in a run without ``teachers`` and
``routing.key`` or ensembles: that run is a one-teacher run exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING

from kdlib.config.node import ConfigNode

# The name of the run's own ``teacher`` among the named teachers (routes, metrics, tables).
DEFAULT_TEACHER = "teacher"


class Combine(str, Enum):
    """How an ensemble combines its members' distributions P_k with weights w_k (summing to 1)."""

    mixture = "mixture"  # sum_k w_k P_k: the probability mixture
    product = "product"  # prod_k P_k^(w_k), renormalised: log-linear (a product of experts)


@dataclass
class EnsembleConfig(ConfigNode):
    """One ensemble: a target distribution combined from several teachers."""

    # The teachers combined, by name (`teacher` is the run's teacher, others are keys of `teachers`).
    members: list[str] = MISSING
    # One fixed weight per member (normalised to sum 1); null: equal weights.
    weights: Optional[list[float]] = None
    # Data column holding per-sample weights ({member: weight} or a list in members' order);
    # a sample without it takes `weights`.
    weights_key: Optional[str] = None
    # mixture (sum of w_k P_k) or product (normalised prod of P_k^w_k).
    combine: Combine = Combine.mixture

    def check(self) -> None:
        if len(self.members) < 2 or len(set(self.members)) != len(self.members):
            raise ValueError(f"members must name at least two distinct teachers, got {list(self.members)}")
        if self.weights is not None:
            check_weights(list(self.weights), list(self.members))


def check_weights(weights: list, members: list[str]) -> list[float]:
    """``weights`` as floats summing to 1 (ValueError: wrong count, a negative or non-finite
    value, or all zero)."""
    if len(weights) != len(members):
        raise ValueError(f"weights must give one weight per member ({len(members)}: {', '.join(members)}), "
                         f"got {len(weights)}")
    values = []
    for member, weight in zip(members, weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weights: the weight of {member} must be a finite number >= 0, got {weight!r}")
        values.append(float(weight))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"weights are all zero ({dict(zip(members, values))}): at least one must be positive")
    return [w / total for w in values]


@dataclass
class RoutingConfig(ConfigNode):
    """Which teacher (or ensemble) scores each sample, and how several teachers share a machine."""

    # Data column naming each sample's teacher or ensemble (null: every sample goes to `default`).
    key: Optional[str] = None
    # Values of the `key` column that stand for a teacher or ensemble ({code: coder, math: coder});
    # a value neither listed here nor naming a teacher or ensemble is an error naming its row.
    map: dict[str, str] = field(default_factory=dict)
    # The teacher or ensemble of samples without a key (null: such a sample is an error naming
    # its file and row).
    default: Optional[str] = DEFAULT_TEACHER
    # Named ensembles: targets a sample can be routed to like a teacher.
    ensembles: dict[str, EnsembleConfig] = field(default_factory=dict)
    # Privileged context per teacher: the column holding that teacher's own prompt (as
    # data.teacher_input_key does for every teacher); teachers not listed read data.teacher_input_key.
    input_keys: dict[str, str] = field(default_factory=dict)
    # The teachers take turns: only one is loaded at a time (the others are unloaded and loaded
    # again when their samples come), for teachers that do not fit in memory together.
    take_turns: bool = False
    # A training micro-batch may hold samples of several targets: the student runs one forward over
    # all of them and each target's loss is computed on its samples' rows (the parts' losses share
    # one chunk workspace and one head gradient), so a global batch makes as many micro-batches,
    # of the same sizes, as in a one-teacher run. false: one target per micro-batch (more, smaller
    # micro-batches; 1.04x a one-teacher step against 1.01-1.04x mixed, docs/benchmarks.md). Algorithms
    # that only implement compute_loss (not loss_of) always get one target per micro-batch.
    mix_micro_batches: bool = True

    def check(self) -> None:
        for name in self.ensembles:
            if name == DEFAULT_TEACHER:
                raise ValueError(f"ensembles: {DEFAULT_TEACHER!r} names the run's teacher; choose another name")


def named_teachers(cfg: Any) -> dict[str, Any]:
    """Every teacher of the run by name: the run's ``teacher`` first, then ``teachers`` in order."""
    return {DEFAULT_TEACHER: cfg.teacher, **dict(cfg.teachers)}


def config_key(name: str) -> str:
    """Where teacher ``name`` is configured: ``teacher`` or ``teachers.<name>``."""
    return DEFAULT_TEACHER if name == DEFAULT_TEACHER else f"teachers.{name}"


def several_teachers(cfg: Any) -> bool:
    """Whether samples are routed (named teachers, ensembles, a route column or another default);
    otherwise the run is a one-teacher run exactly."""
    routing = cfg.routing
    return bool(cfg.teachers or routing.ensembles or routing.key or routing.input_keys or routing.map
                or routing.default != DEFAULT_TEACHER)


def members_of(cfg: Any, target: str) -> tuple[str, ...]:
    """The teachers of a target: itself for a teacher, an ensemble's members."""
    ensemble = cfg.routing.ensembles.get(target)
    return (target,) if ensemble is None else tuple(ensemble.members)


def check_run(cfg: Any) -> None:
    """The rules of routed runs across the config (ConfigError naming the key); nothing for a
    one-teacher run. Pure: reads, never writes."""
    from kdlib.errors import ConfigError

    placed = cfg.launcher.teachers if cfg.launcher.name == "ray" else {}
    for name in placed:
        if name not in cfg.teachers:
            raise ConfigError(f"launcher.teachers.{name}: no teacher is named {name!r} (teachers: "
                              f"{', '.join(cfg.teachers) or 'none'})")
    if not several_teachers(cfg):
        return
    teachers = named_teachers(cfg)
    routing = cfg.routing
    for name, teacher in cfg.teachers.items():
        _check_named_teacher(cfg, name, teacher)
    for name, ensemble in routing.ensembles.items():
        if name in teachers:
            raise ConfigError(f"routing.ensembles.{name}: a teacher has that name; give the ensemble another")
        unknown = [m for m in ensemble.members if m not in teachers]
        if unknown:
            raise ConfigError(f"routing.ensembles.{name}.members: unknown teacher {unknown[0]!r}; teachers: "
                              f"{', '.join(teachers)}")
    targets = [*teachers, *routing.ensembles]
    if routing.default is None and not routing.key:
        raise ConfigError("routing.default=null needs routing.key: without a route column no sample has a teacher")
    if routing.default is not None and routing.default not in targets:
        raise ConfigError(f"routing.default: unknown teacher or ensemble {routing.default!r}; choose one of: "
                          f"{', '.join(targets)}")
    for value, target in routing.map.items():
        if target not in targets:
            raise ConfigError(f"routing.map.{value}: unknown teacher or ensemble {target!r}; choose one of: "
                              f"{', '.join(targets)}")
    if routing.map and not routing.key:
        raise ConfigError("routing.map needs routing.key: the column whose values it maps")
    for name in routing.input_keys:
        if name not in teachers:
            raise ConfigError(f"routing.input_keys.{name}: unknown teacher {name!r}; teachers: {', '.join(teachers)}")
    _check_run_shape(cfg)


def _check_named_teacher(cfg: Any, name: str, teacher: Any) -> None:
    from kdlib.backends import TEACHER_BACKENDS
    from kdlib.errors import ConfigError

    key = f"teachers.{name}"
    if not name.isidentifier() or name == DEFAULT_TEACHER:
        raise ConfigError(f"{key}: a teacher's name must be an identifier other than {DEFAULT_TEACHER!r}")
    backend = teacher.backend.name
    if backend not in TEACHER_BACKENDS:
        raise ConfigError(f"{key}.backend.name: unknown teacher backend {backend!r}; choose one of: "
                          f"{', '.join(TEACHER_BACKENDS.names())}")
    expected = TEACHER_BACKENDS.entry(backend).config_cls
    if expected is not None and not isinstance(teacher.backend, expected):
        raise ConfigError(f"{key}.backend.name={backend} does not switch the backend's options: choose it with "
                          f"teacher/backend@{key}.backend={backend}")
    if teacher.follows_student:
        raise ConfigError(f"{key}: only the run's own teacher can follow the student (update_freq / ema_decay); a "
                          "named self-distillation teacher is a frozen copy of the initial student")
    if teacher.num_workers != 1 and cfg.launcher.name != "ray":
        raise ConfigError(f"{key}.num_workers={teacher.num_workers} needs launcher=ray")


def _check_run_shape(cfg: Any) -> None:
    """What routed runs do not do (yet), said before anything loads."""
    from kdlib.errors import ConfigError

    if cfg.routing.ensembles and cfg.algorithm.name not in ENSEMBLE_ALGORITHMS:
        raise ConfigError(f"routing.ensembles combine distributions on the student's vocabulary: use "
                          f"algorithm=vanilla (same tokenizer) or algorithm=marginal (any tokenizers), not "
                          f"algorithm={cfg.algorithm.name}")
    if cfg.routing.take_turns:
        if cfg.pipeline.prefetch:
            raise ConfigError("routing.take_turns needs pipeline.prefetch=0: a teacher is loaded only for its turn")
        if cfg.teacher.follows_student:
            raise ConfigError("routing.take_turns unloads teachers between turns; a teacher that follows the student "
                              "(teacher.update_freq / ema_decay) must stay loaded")


# Algorithms whose KD term is a divergence per student row between the student's distribution
# and one target on its vocabulary: the ensemble term replaces that target by the combination.
ENSEMBLE_ALGORITHMS = ("vanilla", "marginal")


def resolve_teachers(cfg: Any, record: Any, bf16_native: Any) -> None:
    """Settle the named teachers' ``auto`` precisions (as the run's teacher's), and give a backend
    named only by ``name`` its registered options class."""
    from kdlib.backends import TEACHER_BACKENDS
    from kdlib.config.models import Precision, TeacherBackendConfig

    for name, teacher in cfg.teachers.items():
        if teacher.dtype is Precision.auto:
            support = bf16_native()
            teacher.dtype = Precision.bfloat16 if support.native else Precision.float32
            record(f"teachers.{name}.dtype", teacher.dtype.value, support.reason)
        backend = teacher.backend.name
        if backend in TEACHER_BACKENDS:
            options = TEACHER_BACKENDS.entry(backend).config_cls
            if options is not None and type(teacher.backend) is TeacherBackendConfig and options is not TeacherBackendConfig:
                teacher.backend = options(name=backend)  # chosen by name only: the backend's own defaults
                record(f"teachers.{name}.backend", backend, "the backend's options with their defaults")
