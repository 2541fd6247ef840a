"""Run records: metrics as JSON Lines, the loss-curve plot, JSON results.

``metrics.jsonl`` gets one line per logged step (flushed at once, so a crashed run keeps its
history), and the same line goes to the run's experiment trackers; ``plots/loss.png`` (and, with an
on-policy reward, ``plots/reward.png``) is drawn
from it at the end with matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:
    from kdlib.tracking.trackers import Trackers

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends metric rows to ``<run_dir>/metrics.jsonl`` and sends them to the trackers. A run
    resumed at step ``resumed_at`` keeps the rows of the steps up to it and drops the later ones
    (they were written after the checkpoint and are trained again), so each step has one row. A
    run that starts at step 1 in a directory holding an earlier run's rows sets that file aside
    (:func:`set_aside`) rather than appending to it, so one file never mixes two runs."""

    def __init__(self, run_dir: Path, trackers: Optional["Trackers"] = None, resumed_at: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resumed_at:
            self.rows = keep_steps(self.path, resumed_at)
        else:
            set_aside(self.path)
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


def set_aside(path: Path) -> Optional[Path]:
    """Rename a non-empty ``path`` to the first free ``<name>.<n>`` (n = 1, 2, ...), logging where
    it went; returns the new path (None: nothing to set aside)."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}")
    path.replace(target)
    log.warning("%s held an earlier run's metrics: kept as %s", path, target.name)
    return target


def keep_steps(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Rewrite the JSON Lines file ``path`` with only its rows of steps up to ``last_step`` (rows
    without a step, and a last line cut by a crash, are dropped); returns the rows kept."""
    path = Path(path)
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short when the run was killed
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            kept.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    tmp.replace(path)
    return kept


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    """``n`` bytes as people read them (1.5 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def read_json(path: Path) -> Any:
    """A JSON file kdlib wrote, or None when it is missing or unreadable (a run killed mid-write)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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


def plot_reward_curves(rows: Iterable[dict[str, Any]], path: Path) -> Path | None:
    """On-policy runs with a reward: the mean reward of each step's rollouts (left axis) and the
    step's KD divergence per token (right axis) against the step; None without rewards."""
    rows = [r for r in rows if "step" in r and r.get("reward_mean") is not None]
    if not rows:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    marker = "." if len(rows) < 50 else None
    ax.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], color="tab:green", marker=marker,
            label="reward (mean of the step's rollouts)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    kl = ax.twinx()
    kl.plot([r["step"] for r in rows], [r["kd_loss"] for r in rows], color="tab:blue", marker=marker,
            label="KD divergence per token")
    kl.set_ylabel("KD divergence per token")
    ax.set_title("on-policy reward and divergence")
    ax.grid(alpha=0.3)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.9), fontsize="small")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
