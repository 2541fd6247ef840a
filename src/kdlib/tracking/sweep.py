"""The end of a sweep: one table comparing every job, printed and saved at the sweep's root.

``kdlib -m loss=kl,rkl,jsd`` runs one job per value, each in its own directory named by what it
varies (``0_loss=kl``). When the sweep ends (a Hydra callback, :class:`SweepReport`), every job's
held-out results are read back from its run directory and compared in ``sweep_results.md`` (the
table), ``sweep_results.json`` (the same, for programs) and ``sweep_results.png`` (the held-out
KL and bits per byte per job), with where each job's student is, or that it was not saved, the
job with the lowest held-out KL as one ``kdlib`` command line, and why a job failed (a failed job does not stop the others: its one-line error is kept in its
directory as ``error.txt``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

from kdlib.tracking.records import directory_bytes, human_bytes, read_json, write_json

log = logging.getLogger(__name__)

METRICS = (("kl", "held-out KL"), ("ce", "student CE"), ("top1_agreement", "top-1"), ("bits_per_byte", "bits/byte"))
ERROR_FILE = "error.txt"


class SweepReport(Callback):
    """Hydra callback: writes and prints the sweep's comparison when the sweep ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        report = write_sweep_report(Path(config.hydra.sweep.dir))
        if report is not None:
            print(report)


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of a sweep (those Hydra wrote its overrides into)."""
    from kdlib.tracking.trackers import swept_keys

    swept = swept_keys(sweep_dir / "multirun.yaml")
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                      key=lambda p: int(p.name.split("_", 1)[0]) if p.name.split("_", 1)[0].isdigit() else 0):
        overrides = [str(o) for o in _load_yaml(job / ".hydra" / "overrides.yaml") or []]
        varied = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides
        results = read_json(job / "results.json") or {}
        error = (job / ERROR_FILE).read_text(encoding="utf-8").strip() if (job / ERROR_FILE).exists() else None
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(varied), "directory": str(job)}
        if error is not None or not results:
            row["status"] = f"failed: {error}" if error else "did not finish"
        else:
            row["status"] = "done"
            after = results.get("eval_after") or {}
            before = results.get("eval_before") or {}
            for key, _ in METRICS:
                row[key] = after.get(key)
                row[f"{key}_before"] = before.get(key)
            row["skipped_steps"] = len(results.get("skipped_steps") or [])
            student = results.get("student_dir")
            row["student"] = student
            row["student_bytes"] = _size(Path(student)) if student else None
            pruned = read_json(job / "pruning" / "prune.json")
            row["params"] = pruned["params_after"] if pruned else None
        row["command"] = _command(overrides, sweep_dir)
        rows.append(row)
    return rows


def _command(overrides: list[str], sweep_dir: Path) -> str:
    """A job as one ``kdlib`` run: its overrides, less a recipe that made the sweep by itself
    (``hydra.sweeper.params``, e.g. +recipe=prune_search) and its settings."""
    import shlex

    from omegaconf import OmegaConf

    multirun = sweep_dir / "multirun.yaml"
    own_sweep = multirun.is_file() and bool(OmegaConf.select(OmegaConf.load(multirun), "hydra.sweeper.params"))
    kept = [o for o in overrides if not (own_sweep and o.startswith("+recipe="))]
    return shlex.join(["kdlib", *kept])


def write_sweep_report(sweep_dir: Path) -> Optional[str]:
    """Write sweep_results.{md,json,png} at ``sweep_dir``; returns the table's text (None: no job)."""
    rows = job_rows(sweep_dir)
    if not rows:
        return None
    write_json(sweep_dir / "sweep_results.json", rows)
    text = markdown_table(rows)
    best = winner(rows)
    if best is not None:
        text += (f"\n\nlowest held-out KL: job {best['job']} ({best['kl']:.4f}); as one run:\n"
                 f"    {best['command']}")
    (sweep_dir / "sweep_results.md").write_text(f"# {sweep_dir}\n\n{text}\n", encoding="utf-8")
    _plot(rows, sweep_dir / "sweep_results.png")
    return f"sweep results ({sweep_dir / 'sweep_results.md'}):\n{text}"


def winner(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The finished job with the lowest held-out KL (None when no job finished)."""
    done = [r for r in rows if r["status"] == "done" and r.get("kl") is not None]
    return min(done, key=lambda r: r["kl"]) if len(done) > 1 else None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Overrides and held-out metrics after training per job, best in bold; the metrics before
    training too when they differ between jobs (each job starts from another student), and the
    student's parameter count when jobs pruned it."""
    done = [r for r in rows if r["status"] == "done"]
    before = [key for key, _ in METRICS if len({r.get(f"{key}_before") for r in done}) > 1]
    sized = any(r.get("params") for r in done)
    header = ["job", "overrides", *(["params"] if sized else []), *[f"{label} before" for key, label in METRICS if key in before],
              *[label for _, label in METRICS], "student"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    best = {key: min((r[key] for r in rows if r.get(key) is not None), default=None) for key, _ in METRICS}
    best["top1_agreement"] = max((r["top1_agreement"] for r in rows if r.get("top1_agreement") is not None), default=None)
    for row in rows:
        cells = [row["job"], row["overrides"]]
        if row["status"] != "done":
            cells += [row["status"]] + [""] * (len(header) - 3)
        else:
            if sized:
                cells.append(f"{row['params']:,}" if row.get("params") else "")
            for key in before:
                value = row.get(f"{key}_before")
                cells.append("" if value is None else f"{value:.4f}")
            for key, _ in METRICS:
                value = row.get(key)
                cell = "" if value is None else f"{value:.4f}"
                cells.append(f"**{cell}**" if value is not None and value == best[key] and len(rows) > 1 else cell)
            student = row.get("student")
            cells.append(f"{student} ({human_bytes(row['student_bytes'])})" if student else "not saved")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    done = [r for r in rows if r["status"] == "done" and r.get("kl") is not None]
    if not done:
        return
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 1.2 * len(done) + 2), 3.2))
    for i, (key, label) in enumerate((("kl", "held-out KL(teacher || student)"), ("bits_per_byte", "bits per byte"))):
        axis = figure.add_subplot(1, 2, i + 1)
        values = [r.get(key) or 0.0 for r in done]
        axis.bar(range(len(done)), values)
        axis.set_xticks(range(len(done)), [r["overrides"] for r in done], rotation=30, ha="right", fontsize=7)
        axis.set_title(label, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _size(path: Path) -> int:
    return directory_bytes(path) if path.exists() else 0


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def record_failure(job_dir: Path, message: str) -> None:
    """Keep a failed sweep job's one-line error in its directory, for the sweep's table."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / ERROR_FILE).write_text(message + "\n", encoding="utf-8")
