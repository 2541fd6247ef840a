"""``kdlib.run(cfg)``: one run from a typed config, the same for the CLI, notebooks and tests.

Resolves the run directory (Hydra's under the CLI; ``outputs/<date>/<time>`` otherwise), writes
the resolved config there, routes kdlib's log records to ``<run dir>/kdlib.log`` (and to the
console when nothing else shows them), starts the experiment trackers (before any model loads, so
one that cannot start costs seconds), builds the pipeline and runs its controller loop.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from kdlib.config.compose import import_plugins, to_typed
from kdlib.config.schema import KDConfig
from kdlib.data.preflight import check_data_files
from kdlib.pipeline import Pipeline
from kdlib.progress import configured as progress_shown
from kdlib.result import RunResult
from kdlib.tracking.trackers import RunIdentity, Trackers

log = logging.getLogger("kdlib")


def run(
    cfg: KDConfig | DictConfig, *, run_dir: Optional[str | Path] = None, identity: Optional[RunIdentity] = None
) -> RunResult:
    """Run ``cfg`` (from ``kdlib.compose`` or Hydra) and return its metrics and paths.
    ``identity``: the run's name and sweep for the trackers (the CLI passes Hydra's)."""
    if isinstance(cfg, KDConfig):
        import_plugins(cfg.plugins)
    typed = to_typed(cfg)
    check_data_files(typed.data)  # a bad file or row costs seconds, not a model load
    directory = Path(run_dir or typed.output_dir or default_run_dir())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(typed), resolve=True), encoding="utf-8")
    with _run_logging(directory), progress_shown(typed.logging.progress):
        log.info("run directory: %s", directory.resolve())
        for key, choice in typed.auto_choices.items():
            log.info("%s = %s", key, choice)
        start = time.perf_counter()
        with Trackers.start(typed, directory, identity) as trackers, \
                Pipeline.from_config(typed, directory, trackers) as pipeline:
            result = pipeline.run()
        log.info("finished in %.1f s", time.perf_counter() - start)
    return result


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
