"""The TensorBoard tracker (``logging.trackers=[tensorboard]``), through torch's SummaryWriter.

A single run writes its event files to ``<run dir>/tensorboard/``. A job of a Hydra sweep writes
to ``<sweep dir>/tensorboard/<job num>-<swept overrides>/`` instead, so ``tensorboard --logdir
<sweep dir>/tensorboard`` shows the sweep as one view with a run per job (``0-loss=kl``,
``1-loss=rkl``, ...). Metrics are scalars under their metrics.jsonl names; the config, the eval
table and rollout samples are text (Markdown); the loss plot is an image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kdlib.config.schema import KDConfig
from kdlib.tracking.trackers import RunIdentity, Tracker


def log_dir(run_dir: Path, identity: RunIdentity) -> Path:
    """Where the event files of this run go."""
    if identity.sweep_dir is None:
        return Path(run_dir) / "tensorboard"
    name = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", identity.name)[:120]
    return Path(identity.sweep_dir) / "tensorboard" / f"{identity.job_num}-{name}"


class TensorBoardTracker(Tracker):
    def __init__(self, cfg: KDConfig, run_dir: Path, identity: RunIdentity, config: dict[str, Any]) -> None:
        super().__init__(cfg, run_dir, identity, config)
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir(run_dir, identity)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=10)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
        self.writer.add_text(key, "\n".join(lines), step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        from matplotlib.image import imread

        self.writer.add_image(key, imread(str(path))[..., :3], step, dataformats="HWC")

    def finish(self, failed: bool) -> None:
        self.writer.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")
