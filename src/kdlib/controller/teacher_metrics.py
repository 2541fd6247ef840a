"""What a routed run reports per teacher: per step, and on the held-out samples each teacher scores.

Per optimizer step (``metrics.jsonl``): for each route target (teacher or ensemble) the samples and
student loss tokens routed to it and its loss and KD loss per loss token
(``routed/<target>/samples|loss_tokens|loss|kd_loss``), and for each teacher the tokens it read
(``teacher/<name>/tokens``; an ensemble's members each read its samples). Held out
(``eval.json``, the trackers' ``eval/``): each teacher's KL, top-1 agreement and bits per byte on
the samples it scores, against that teacher (``teacher/<name>/<metric>``), printed as one row per
teacher under the run's held-out table.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from rich.table import Table

from kdlib.batch import MicroBatch
from kdlib.evaluation import HeldoutSums
from kdlib.routing import split_parts

PREFIX = "teacher/"
# The per-teacher held-out columns: (metric, heading).
COLUMNS = (("tokens", "tokens"), ("kl", "KL(teacher || student)"), ("top1_agreement", "top-1 agreement"),
           ("bits_per_byte", "student bits/byte"), ("teacher_bits_per_byte", "teacher bits/byte"))


def route_metrics(batches: list[MicroBatch], results: Iterable[Any]) -> dict[str, float]:
    """The step's per-route and per-teacher figures (nothing for a one-teacher run)."""
    out: dict[str, float] = {}
    if any(batch.route is None for batch in batches):
        return {}
    for batch in split_parts(batches)[0]:
        route = batch.route
        key = f"routed/{route.target}/"
        out[key + "samples"] = out.get(key + "samples", 0.0) + len(batch.sample_ids)
        out[key + "loss_tokens"] = out.get(key + "loss_tokens", 0.0) + batch.n_loss_tokens
        for member in route.members:
            tokens = f"{PREFIX}{member}/tokens"
            out[tokens] = out.get(tokens, 0.0) + route.view(batch, member).teacher_view.n_tokens
    sums: dict[str, list[float]] = {}
    for result in results:
        for target, (loss, kd) in result.routes.items():
            total = sums.setdefault(target, [0.0, 0.0])
            total[0] += loss
            total[1] += kd
    for target, (loss, kd) in sums.items():
        tokens = out.get(f"routed/{target}/loss_tokens", 0.0)
        out[f"routed/{target}/loss"] = loss / max(tokens, 1.0)
        out[f"routed/{target}/kd_loss"] = kd / max(tokens, 1.0)
    return out


def add_per_teacher(total: dict[str, HeldoutSums], more: dict[str, HeldoutSums]) -> dict[str, HeldoutSums]:
    for name, sums in more.items():
        total[name] = total.get(name, HeldoutSums()).add(sums)
    return total


def teacher_means(per_teacher: dict[str, HeldoutSums]) -> dict[str, float]:
    """Each teacher's held-out means as flat ``teacher/<name>/<metric>`` entries."""
    return {f"{PREFIX}{name}/{metric}": value for name, sums in per_teacher.items()
            for metric, value in sums.means().items()}


def teacher_table(before: Optional[dict[str, float]], after: dict[str, float]) -> Optional[Table]:
    """One row per teacher: tokens, KL, top-1 agreement, student and teacher bits per byte on the
    held-out samples it scores (before -> after where measured before), or None for one teacher."""
    names = sorted({key.split("/")[1] for key in after if key.startswith(PREFIX)})
    if not names:
        return None
    table = Table(title="held-out evaluation per teacher (on the samples each scores)", title_justify="left")
    table.add_column("teacher")
    for _, heading in COLUMNS:
        table.add_column(heading, justify="right")
    for name in names:
        row = [name]
        for metric, _ in COLUMNS:
            key = f"{PREFIX}{name}/{metric}"
            value = after.get(key)
            earlier = None if before is None else before.get(key)
            row.append("" if value is None else _fmt(value, earlier, metric))
        table.add_row(*row)
    return table


def _fmt(value: float, before: Optional[float], metric: str) -> str:
    if metric == "tokens":
        return f"{int(value)}"
    return f"{value:.4f}" if before is None or metric == "teacher_bits_per_byte" else f"{before:.4f} -> {value:.4f}"
