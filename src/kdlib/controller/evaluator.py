"""Held-out evaluation: teacher and student on the eval split, summed over workers.

Reports per-token KL(teacher || student) (same tokenizer), student cross-entropy on the responses,
top-1 agreement with the teacher (per token, or at 1:1 groups across tokenizers) and the
tokenizer-free bits per byte of the response text for the student and the teacher, and renders the
before/after table the run prints at the end. The eval set is processed in rounds (one micro-batch
per student worker, or per teacher worker when there are more of those), the teacher scoring the
next round while the students evaluate this one, so a progress bar can follow it and a long
evaluation is never silent.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.table import Table

from kdlib.controller.dispatch import TeacherDispatch
from kdlib.controller.teacher_metrics import add_per_teacher, teacher_means
from kdlib.data.batching import even_shares
from kdlib.evaluation import HeldoutSums
from kdlib.progress import progress
from kdlib.workers.student import StudentShare

if TYPE_CHECKING:
    from kdlib.config.schema import KDConfig
    from kdlib.data.bundle import DataBundle
    from kdlib.workers.groups import StudentGroup

LABELS = {
    "kl": ("KL(teacher || student) per token", "lower"),
    "signal_kl": ("KL(teacher || student) per token, estimated from the teacher's signal", "lower"),
    "ce": ("student cross-entropy per token", "lower"),
    "top1_agreement": ("top-1 agreement with teacher", "higher"),
    "bits_per_byte": ("student bits per byte of the responses", "lower"),
    "ece": ("student expected calibration error (15 bins)", "lower"),
    "teacher_bits_per_byte": ("teacher bits per byte of the responses", "reference"),
    "reward": ("reward of the student's samples on data.eval prompts", "higher"),
}


class Evaluator:
    """Evaluates the current student on the held-out split.

    The eval micro-batches are built once; the teacher's outputs for them are computed at the
    first evaluation and reused afterwards (``eval.cache_teacher``), since a frozen teacher gives
    the same hidden states every time. Call :meth:`invalidate` when the teacher's weights change.
    """

    def __init__(self, cfg: "KDConfig", data: "DataBundle", students: "StudentGroup", teacher: TeacherDispatch) -> None:
        self.cfg = cfg
        self.students = students
        self.teacher = teacher
        self.batches = data.eval_batches(cfg.eval.batch_size)
        self._teacher_handles: Optional[list] = None

    def invalidate(self) -> None:
        self._teacher_handles = None

    def __call__(self) -> Optional[dict[str, float]]:
        """Held-out metrics of the current student, or None without eval data."""
        if not self.batches:
            return None
        width = max(self.students.size, self.teacher.workers)
        rounds = [self.batches[i : i + width] for i in range(0, len(self.batches), width)]
        cached = self._teacher_handles
        handles: list = []
        total = HeldoutSums()
        per_teacher: dict[str, HeldoutSums] = {}  # several teachers: each one's own samples
        job = None if cached is not None else self.teacher.submit(rounds[0])
        with progress("evaluating", total=len(self.batches), unit="batch", enabled=self.cfg.logging.progress) as bar:
            for index, batches in enumerate(rounds):
                if cached is not None:
                    round_handles = cached[len(handles) : len(handles) + len(batches)]
                else:
                    round_handles = self.teacher.collect(job).handles
                    if index + 1 < len(rounds):  # the teacher scores the next round meanwhile
                        job = self.teacher.submit(rounds[index + 1])
                handles.extend(round_handles)
                results = self._evaluate_round(batches, round_handles)
                if any(r.unserved for r in results):  # a cached output could not be read: once more
                    unserved = {key for r in results for key in r.unserved}
                    round_handles = self.teacher.recompute(batches, round_handles, unserved)
                    handles[-len(batches):] = round_handles
                    results = self._evaluate_round(batches, round_handles)
                for result in results:
                    total = total.add(result.sums)
                    add_per_teacher(per_teacher, result.per_teacher)
                bar.update(len(batches))
        if cached is None and self.cfg.eval.cache_teacher:
            self._teacher_handles = handles
        # what was measured (no teacher: no KL, agreement or teacher figure), and per teacher
        return {**total.means(), **teacher_means(per_teacher)}

    def _evaluate_round(self, batches: list, handles: list) -> list:
        shares = even_shares(list(zip(batches, handles)), self.students.size)
        return self.students.evaluate([
            StudentShare([b for (b, _), _ in share], [h for (_, h), _ in share], [w for _, w in share])
            for share in shares
        ])


def comparison_table(before: Optional[dict[str, float]], after: dict[str, float],
                     notes: Optional[dict[str, str]] = None) -> Table:
    """The before/after table; ``notes`` add rows of text under it (label -> value)."""
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
        row = [label if better == "reference" else f"{label} ({better} is better)"]
        if before is not None:
            row.append(f"{before[key]:.4f}" if key in before else "")
        row.append(f"{after[key]:.4f}")
        if before is not None:
            row.append(f"{after[key] - before[key]:+.4f}" if key in before else "")
        table.add_row(*row)
    for label, value in (notes or {}).items():
        table.add_row(label, *([""] if before is not None else []), value, *([""] if before is not None else []))
    return table


def print_table(table: Table) -> str:
    """Print ``table`` to the terminal and return it as plain text (for the run log)."""
    Console().print(table)
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(table)
    return buffer.getvalue()
