"""The Weights & Biases tracker (``logging.trackers=[wandb]``, options at ``logging.wandb``).

One W&B run per kdlib run, with the resolved config as its config, the run directory's ``wandb/``
as its local directory, and the Hydra sweep as its group. ``WANDB_MODE=offline`` (or
``logging.wandb.mode=offline``) writes everything there, and ``wandb sync <run dir>/wandb/offline-run-*``
uploads it later. W&B's own console capture and system metrics are off: kdlib logs its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdlib.config.schema import KDConfig
from kdlib.tracking.trackers import RunIdentity, Tracker


class WandbTracker(Tracker):
    def __init__(self, cfg: KDConfig, run_dir: Path, identity: RunIdentity, config: dict[str, Any]) -> None:
        super().__init__(cfg, run_dir, identity, config)
        import wandb

        options = cfg.logging.wandb
        self._wandb = wandb
        self.run = wandb.init(
            project=options.project,
            entity=options.entity,
            mode=None if options.mode is None else options.mode.value,
            group=options.group or identity.group,
            name=identity.name,
            tags=list(options.tags) or None,
            dir=str(run_dir),
            config=config,
            reinit="finish_previous",  # a sweep runs its jobs one after another in one process
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        self.run.log(row, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def log_summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
