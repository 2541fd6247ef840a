"""Held-out evaluation: teacher and student on the eval split, summed over workers.

Reports per-token KL(teacher || student), student cross-entropy on the responses and top-1
agreement with the teacher, and renders the before/after table the run prints at the end.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.table import Table

from kdlib.controller.dispatch import teacher_forward
from kdlib.data.batching import micro_batches, split_across_workers
from kdlib.evaluation import HeldoutSums

if TYPE_CHECKING:
    from kdlib.pipeline import Pipeline

LABELS = {
    "kl": ("KL(teacher || student) per token", "lower"),
    "ce": ("student cross-entropy per token", "lower"),
    "top1_agreement": ("top-1 agreement with teacher", "higher"),
}


def evaluate(pipeline: "Pipeline") -> Optional[dict[str, float]]:
    """Held-out metrics of the current student, or None without eval data."""
    data = pipeline.data
    if data is None or not data.eval:
        return None
    size = pipeline.cfg.eval.batch_size
    batches = [data.collate(chunk) for chunk in micro_batches(data.eval, size)]
    handles = teacher_forward(pipeline.teacher, batches)
    pairs = list(zip(batches, handles))
    shares = split_across_workers(pairs, pipeline.student.size)
    results = pipeline.student.call_each(
        "evaluate", [([b for b, _ in share], [h for _, h in share]) for share in shares]
    )
    total = HeldoutSums()
    for sums in results:
        total = total.add(sums)
    if pipeline.teacher is not None:
        pipeline.teacher.call("take_stats")  # evaluation traffic is not a training step's
    out = total.means()
    if pipeline.teacher is None:
        out.pop("kl")
        out.pop("top1_agreement")
    return out


def comparison_table(before: Optional[dict[str, float]], after: dict[str, float]) -> Table:
    table = Table(title="held-out evaluation", title_justify="left")
    table.add_column("metric")
    if before is not None:
        table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    if before is not None:
        table.add_column("change", justify="right")
    for key, (label, better) in LABELS.items():
        if key not in after:
            continue
        row = [f"{label} ({better} is better)"]
        if before is not None:
            row.append(f"{before[key]:.4f}")
        row.append(f"{after[key]:.4f}")
        if before is not None:
            row.append(f"{after[key] - before[key]:+.4f}")
        table.add_row(*row)
    return table


def print_table(table: Table) -> str:
    """Print ``table`` to the terminal and return it as plain text (for the run log)."""
    Console().print(table)
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(table)
    return buffer.getvalue()
