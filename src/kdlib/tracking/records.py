"""Run records: metrics as JSON Lines, the loss-curve plot, JSON results.

``metrics.jsonl`` gets one line per logged step (flushed at once, so a crashed run keeps its
history), and the same line goes to the run's experiment trackers; ``plots/loss.png`` is drawn
from it at the end with matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:
    from kdlib.tracking.trackers import Trackers


class MetricsWriter:
    """Appends metric rows to ``<run_dir>/metrics.jsonl`` and sends them to the trackers."""

    def __init__(self, run_dir: Path, trackers: Optional["Trackers"] = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        self.trackers = trackers
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()
        if self.trackers:
            self.trackers.log_metrics(row)

    def close(self) -> None:
        self._handle.close()


def write_json(path: Path, value: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")


def plot_loss_curves(rows: Iterable[dict[str, Any]], path: Path, *, keys: tuple[str, ...] = ("loss", "kd_loss", "ce_loss")) -> Path | None:
    """Loss curves against the step; returns the PNG path, or None when there is nothing to draw."""
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=key, marker="." if len(points) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per token")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
