"""Experiment trackers: what a run writes to ``metrics.jsonl`` also goes to W&B or TensorBoard.

``logging.trackers=[wandb,tensorboard]`` names entries of the ``tracker`` registry (lazy
``"module:Class"`` strings, so a tracker's package is imported only when it is chosen). Each one
receives every metrics line, the resolved config, the held-out evaluations and the before/after
table, the loss plot, and on-policy rollout samples, through :class:`Trackers`, which fans the
calls out. Trackers start in :func:`kdlib.run` before any model loads: a tracker that cannot start
is a one-line :class:`~kdlib.errors.ConfigError` then (its package missing is caught earlier, at
composition). Once training runs, a tracker that fails is logged once and dropped; it never stops
the run. A Hydra sweep (``-m``) names its jobs after the swept overrides (``loss=kl``) and groups
them by the sweep (W&B group; one TensorBoard log directory for the whole sweep).
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kdlib.config.schema import KDConfig
from kdlib.errors import ConfigError, first_line
from kdlib.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackerInfo:
    """Static facts about a tracker, read at composition without importing it."""

    # The module that must be importable for the tracker to start.
    package: str
    # The kdlib extra that installs it.
    extra: str = "trackers"


@dataclass(frozen=True)
class RunIdentity:
    """Where a run sits: its display name and, for a job of a Hydra sweep, the sweep."""

    name: str
    # The sweep directory of a ``-m`` job (its W&B group), None for a single run.
    sweep_dir: Optional[str] = None
    # hydra.job.num of a sweep job.
    job_num: Optional[int] = None

    @property
    def group(self) -> Optional[str]:
        return self.sweep_dir


class Tracker(ABC):
    """One experiment tracker for one run. The constructor starts it (and raises if it cannot)."""

    def __init__(self, cfg: KDConfig, run_dir: Path, identity: RunIdentity, config: dict[str, Any]) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.identity = identity

    @abstractmethod
    def log_metrics(self, row: dict[str, float], step: int) -> None:
        """One metrics line (the keys of metrics.jsonl, without ``step``)."""

    @abstractmethod
    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A small table (the eval before/after table, rollout samples)."""

    @abstractmethod
    def log_image(self, key: str, path: Path, step: int) -> None:
        """A PNG file (the loss plot)."""

    def log_summary(self, values: dict[str, float]) -> None:
        """Final values of the run (held-out metrics before and after). Default: nothing."""

    @abstractmethod
    def finish(self, failed: bool) -> None:
        """Flush and close."""


TRACKERS: Registry[type[Tracker]] = Registry("tracker")
TRACKERS.register("wandb", "kdlib.tracking.wandb_tracker:WandbTracker", info=TrackerInfo(package="wandb"))
TRACKERS.register("tensorboard", "kdlib.tracking.tensorboard_tracker:TensorBoardTracker",
                  info=TrackerInfo(package="tensorboard"))


def check_trackers(cfg: KDConfig) -> None:
    """Composition check: known names, no repeats, each tracker's package installed."""
    names = list(cfg.logging.trackers)
    if len(set(names)) != len(names):
        raise ConfigError(f"logging.trackers lists a tracker twice: {names}")
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"logging.trackers: unknown tracker {name!r}; choose from: {', '.join(TRACKERS.names())}")
        info: TrackerInfo = TRACKERS.entry(name).info
        if info is not None and importlib.util.find_spec(info.package) is None:
            raise ConfigError(f"logging.trackers: {name} needs the {info.package} package: pip install 'kdlib[{info.extra}]'")
    if cfg.logging.tracker_samples < 0:
        raise ConfigError(f"logging.tracker_samples must be >= 0, got {cfg.logging.tracker_samples}")


class Trackers:
    """The run's trackers as one object (none at all is a valid, silent set)."""

    def __init__(self, trackers: Optional[list[Tracker]] = None) -> None:
        self.trackers = list(trackers or [])

    @classmethod
    def start(cls, cfg: KDConfig, run_dir: Path, identity: Optional[RunIdentity] = None) -> "Trackers":
        """Start every tracker of ``cfg.logging.trackers``; the first that fails stops the others
        and raises a one-line ConfigError."""
        from omegaconf import OmegaConf

        if not cfg.logging.trackers:
            return cls()
        identity = identity or RunIdentity(name=Path(run_dir).name)
        config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
        started: list[Tracker] = []
        for name in cfg.logging.trackers:
            try:
                started.append(TRACKERS.get(name)(cfg, Path(run_dir), identity, config))
            except Exception as exc:  # any failure of a third-party client while starting
                cls(started).finish(failed=True)
                raise ConfigError(f"logging.trackers: {name} failed to start: {first_line(exc)}") from None
        log.info("trackers: %s (run %s%s)", ", ".join(cfg.logging.trackers), identity.name,
                 f", sweep {identity.sweep_dir}" if identity.sweep_dir else "")
        return cls(started)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, row: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self._each("log_metrics", values, int(row["step"]))

    def log_eval(self, metrics: Optional[dict[str, float]], step: int) -> None:
        """Held-out metrics as ``eval/<name>`` scalars at ``step`` (0 = before training)."""
        if metrics:
            self._each("log_metrics", {f"eval/{k}": float(v) for k, v in metrics.items()}, step)

    def log_eval_table(self, before: Optional[dict[str, float]], after: Optional[dict[str, float]], step: int) -> None:
        """The before/after table of the held-out evaluation, and the values as the run's summary."""
        if not after:
            return
        rows = [[key, None if before is None else before.get(key), value,
                 None if before is None or key not in before else value - before[key]]
                for key, value in after.items()]
        self._each("log_table", "eval/table", ["metric", "before", "after", "change"], rows, step)
        summary = {f"eval/after/{k}": float(v) for k, v in after.items()}
        summary.update({f"eval/before/{k}": float(v) for k, v in (before or {}).items()})
        self._each("log_summary", summary)

    def log_image(self, key: str, path: Optional[Path], step: int) -> None:
        if path is not None:
            self._each("log_image", key, Path(path), step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """On-policy rollouts: prompt (last message), response, length, finish reason."""
        if not rows:
            return
        columns = ["step", "prompt", "response", "response_tokens", "finish_reason"]
        table = [[row["step"], _last_message(row["prompt"]), row["response"], row["response_tokens"],
                  row["finish_reason"]] for row in rows]
        self._each("log_table", "rollouts", columns, table, step)

    def finish(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish(failed)
            except Exception as exc:  # closing must not hide the run's own outcome
                log.warning("tracker %s failed to finish: %s", type(tracker).__name__, first_line(exc))
        self.trackers = []

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.finish(failed=exc_type is not None)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker never stops training
                log.warning("tracker %s failed in %s (%s); it gets nothing more from this run",
                            type(tracker).__name__, method, first_line(exc))
                self.trackers.remove(tracker)


def identity_from_hydra(hydra_cfg: Any) -> RunIdentity:
    """The run's name and sweep from Hydra's runtime config (``HydraConfig.get()``).

    A sweep job is named after the overrides the sweep varies (``loss=kl``), read from the
    sweep's ``multirun.yaml``; Hydra's ``override_dirname`` (every override) is the fallback.
    """
    from hydra.types import RunMode

    output_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return RunIdentity(name=output_dir.name)
    sweep_dir = str(hydra_cfg.sweep.dir)
    job_overrides = list(hydra_cfg.overrides.task)
    swept = swept_keys(Path(sweep_dir) / "multirun.yaml")
    varied = [o for o in job_overrides if o.split("=", 1)[0] in swept]
    name = ",".join(varied) or hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
    return RunIdentity(name=name, sweep_dir=sweep_dir, job_num=int(hydra_cfg.job.num))


def swept_keys(multirun_yaml: Path) -> set[str]:
    """The keys of a sweep's overrides that take several values (empty when unknown)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if not multirun_yaml.is_file():
        return set()
    loaded = OmegaConf.load(multirun_yaml)
    task = OmegaConf.select(loaded, "hydra.overrides.task") or []
    # a recipe's own sweep (hydra.sweeper.params, e.g. +recipe=prune_search)
    params = OmegaConf.select(loaded, "hydra.sweeper.params") or {}
    try:
        parsed = OverridesParser.create().parse_overrides(list(task) + [f"{k}={v}" for k, v in params.items()])
    except Exception:  # not ours to validate: Hydra ran these overrides already
        return set()
    return {o.input_line.split("=", 1)[0] for o in parsed if o.is_sweep_override()}


def _last_message(prompt: Any) -> str:
    if isinstance(prompt, list) and prompt:
        return str(prompt[-1].get("content", ""))
    return str(prompt)
