"""``kdlib.run(cfg)``: one run from a typed config, the same for the CLI, notebooks and tests.

Resolve, then build, then run: the config (a copy: the caller's object is left as it was) is
resolved once, including what needs the checkpoints' own configs, validated and frozen; the run
directory (Hydra's under the CLI; ``outputs/<date>/<time>`` otherwise) gets that frozen config as
``config.yaml``, which is exactly what the workers receive (any later write raises). kdlib's log
records go to ``<run dir>/kdlib.log`` (and to the console when nothing else shows them); the
experiment trackers start before any model loads, so one that cannot start costs seconds; then
the pipeline is built for the mode and the mode runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from kdlib.config.checks import validate
from kdlib.config.compose import import_plugins, to_typed
from kdlib.config.node import freeze, thawed
from kdlib.config.resolve import resolve
from kdlib.config.schema import KDConfig
from kdlib.controller import MODES
from kdlib.data.preflight import check_data_files
from kdlib.data.routes import check_routes
from kdlib.models.hub import check_hub
from kdlib.pipeline import Pipeline
from kdlib.rewards.columns import check_reward_columns
from kdlib.progress import configured as progress_shown
from kdlib.result import RunResult
from kdlib.tracking.trackers import RunIdentity, Trackers

if TYPE_CHECKING:
    from kdlib.controller.mode import RunMode

log = logging.getLogger("kdlib")


def run(
    cfg: KDConfig | DictConfig, *, run_dir: Optional[str | Path] = None, identity: Optional[RunIdentity] = None
) -> RunResult:
    """Run ``cfg`` (from ``kdlib.compose`` or Hydra) and return its metrics and paths.
    ``identity``: the run's name and sweep for the trackers (the CLI passes Hydra's)."""
    typed = resolved(cfg, sweep_job=identity is not None and identity.sweep_dir is not None)
    directory = Path(run_dir or typed.output_dir or resumed_run_dir(typed) or default_run_dir()).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(config_yaml(typed), encoding="utf-8")
    mode = MODES.get(typed.mode.value)
    with _run_logging(directory), progress_shown(typed.logging.progress):
        log.info("run directory: %s", directory)
        for key, choice in typed.auto_choices.items():
            log.info("%s = %s", key, choice)
        start = time.perf_counter()
        with Trackers.start(typed, directory, identity) as trackers, \
                Pipeline.build(typed, directory, trackers, mode.needs(typed)) as pipeline:
            result = mode(pipeline).run()
        log.info("finished in %.1f s", time.perf_counter() - start)
    return result


@contextmanager
def built(cfg: KDConfig | DictConfig, run_dir: Optional[str | Path] = None) -> Iterator["RunMode"]:
    """A run built but not started, for stepping it by hand (notebooks, tests): yields the mode,
    whose ``pipeline`` holds the built parts; the workers are shut down on exit. ``run_dir``
    defaults to a temporary directory, removed on exit."""
    import tempfile

    typed = resolved(cfg)
    mode = MODES.get(typed.mode.value)
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="kdlib-run-"))
        directory = Path(run_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(config_yaml(typed), encoding="utf-8")
        pipeline = stack.enter_context(Pipeline.build(typed, directory, Trackers(), mode.needs(typed)))
        yield mode(pipeline)


def resolved(cfg: KDConfig | DictConfig, *, sweep_job: bool = False) -> KDConfig:
    """The frozen config a run executes: a copy of ``cfg`` resolved (models included), checked."""
    if isinstance(cfg, KDConfig):
        import_plugins(cfg.plugins)
        cfg = thawed(cfg)  # the caller keeps its object; a frozen one may be run again
    typed = to_typed(cfg)
    layouts = check_data_files(typed.data)  # a bad file or row costs seconds, not a model load
    check_reward_columns(typed)  # every row has the answer column the reward reads
    check_hub(typed)  # an unreachable hub costs one connection attempt, not minutes of retries
    resolve(typed, models=True, layouts=layouts, sweep_job=sweep_job)
    validate(typed)
    check_routes(typed)  # several teachers: every row's route, before any model loads
    return freeze(typed)


def config_yaml(cfg: KDConfig) -> str:
    """``cfg`` as the run directory's config.yaml (a config composed from it equals ``cfg``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(thawed(cfg)), resolve=True)


def resumed_run_dir(cfg: KDConfig) -> Optional[Path]:
    """The run directory ``train.resume`` continues (given as the run directory or as one of its
    checkpoints), so that a resumed run keeps writing where it started."""
    if not cfg.train.resume:
        return None
    path = Path(cfg.train.resume).resolve()
    if path.parent.name == "checkpoints" and path.name.startswith("step_"):
        return path.parent.parent
    return path if (path / "checkpoints").is_dir() else None


def default_run_dir() -> Path:
    """``outputs/<date>/<time>`` under the working directory, as Hydra names its run dirs."""
    base = Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    candidate, n = base, 1
    while candidate.exists():
        candidate, n = base.with_name(f"{base.name}_{n}"), n + 1
    return candidate


@contextmanager
def _run_logging(directory: Path) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown kdlib's own
    log_file = (directory / "kdlib.log").resolve()
    handlers: list[logging.Handler] = []
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == log_file
               for h in logging.getLogger().handlers):  # Hydra's job log is this file already
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    if not logging.getLogger().handlers and not log.handlers:
        handlers.append(logging.StreamHandler())  # plain Python: nobody else prints our records
    formatter = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    previous = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        log.setLevel(previous)
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
