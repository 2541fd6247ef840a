"""The student's side of several teachers: one algorithm per teacher, and the ensembles' loss.

A routed run gives the student every teacher's head (and, across tokenizers, the matched
vocabulary) once. :class:`RoutedLoss` builds the configured algorithm once per teacher with that
teacher's head, so a micro-batch routed to one teacher is trained exactly as a one-teacher run with
that teacher would train it (the same algorithm object, the same call). A micro-batch routed to an
ensemble is trained with :func:`kdlib.losses.ensemble.ensemble_loss`: each member's hidden states
are placed at the student rows it covers (every row for a teacher on the student's tokens; the
first student row of each byte-aligned group across tokenizers), its distribution is carried onto
the student's vocabulary as its algorithm carries it, and the target combines them per row. Held-out
sums are computed per member, each against its own teacher. A micro-batch holding several targets
(:class:`~kdlib.routing.MixedRoute`) runs the student's forward once and each part's loss on the
rows of its samples (:meth:`RoutedLoss.part_losses`), the parts' loss evaluations sharing one chunk
workspace and one gradient of the student's head (:mod:`kdlib.losses.shared_buffers`); it needs
algorithms that take a given forward (:meth:`~kdlib.algorithms.base.Algorithm.loss_of`, every
built-in one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdlib.algorithms.base import ALGORITHMS, Algorithm, StudentForward
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, teacher_hidden_for
from kdlib.batch import MicroBatch
from kdlib.config.schema import AlgorithmConfig, LossConfig
from kdlib.evaluation import HeldoutSums
from kdlib.losses import LossTerms
from kdlib.losses.ensemble import Member, ensemble_loss, row_weights
from kdlib.losses.shared_buffers import sharing
from kdlib.models.head import LMHead
from kdlib.routing import MixedRoute
from kdlib.teacher_output import TeacherOutput
from kdlib.xtok.vocab import VocabMatch


@dataclass
class TeacherSide:
    """What the students hold of one teacher: its head, and across tokenizers the matched vocabulary."""

    head: LMHead
    match: Optional[VocabMatch] = None

    def to(self, device: torch.device | str) -> "TeacherSide":
        return TeacherSide(self.head.detached(device=device), None if self.match is None else self.match.to(device))


@dataclass
class RoutedSums:
    """Held-out sums of a routed micro-batch: the batch's (student metrics once, each member's
    comparison with the student) and each member teacher's own."""

    total: HeldoutSums
    per_teacher: dict[str, HeldoutSums]


# (micro-batch as the teacher reads it, its output, its head, its matched vocabulary) -> sums
TeacherSums = Callable[[MicroBatch, TeacherOutput, LMHead, Optional[VocabMatch]], HeldoutSums]


class RoutedLoss:
    """The configured algorithm per teacher, and the ensembles' loss."""

    def __init__(self, cfg: AlgorithmConfig, loss: LossConfig, sides: dict[str, TeacherSide], student: nn.Module) -> None:
        self.cfg = cfg
        self.loss_cfg = loss
        self.matches = {name: side.match for name, side in sides.items()}
        self.algorithms: dict[str, Algorithm] = {}
        for name, side in sides.items():
            algorithm = ALGORITHMS.get(cfg.name)(cfg, loss, side.head)
            algorithm.attach(student, side.match)
            self.algorithms[name] = algorithm

    def modules(self) -> dict[str, nn.Module]:
        """Every teacher's algorithm modules (DSKD's projectors), by ``<teacher>_<name>``."""
        return {f"{teacher}_{name}": module for teacher, algorithm in self.algorithms.items()
                for name, module in algorithm.modules().items()}

    def compute_loss(self, student: nn.Module, batch: MicroBatch, teacher: Any, normaliser: float) -> LossTerms:
        """The loss of a one-target micro-batch: its teacher's algorithm as a one-teacher run calls
        it, or the ensemble's loss."""
        alone = self._one_teacher(batch, teacher)
        if alone is not None:
            name, view, output = alone
            return self.algorithms[name].compute_loss(student, view, output, normaliser)
        return self.loss_of(Algorithm.student_forward(student, batch), batch, teacher, normaliser)

    def part_losses(self, student: nn.Module, batch: MicroBatch, teacher: Any,
                    normaliser: float) -> list[tuple[str, LossTerms]]:
        """(target, loss terms) of each part of a routed micro-batch: one for a one-target batch;
        for a :class:`~kdlib.routing.MixedRoute`, the student's forward once over the whole batch
        and each part's loss on its own rows (the parts' rows follow each other in order)."""
        route = batch.route
        if not isinstance(route, MixedRoute):
            return [(route.target, self.compute_loss(student, batch, teacher, normaliser))]
        forward = Algorithm.student_forward(student, batch)
        out, start = [], 0
        with sharing():  # one chunk workspace and one head gradient for all the parts
            for part, output in zip(route.parts, teacher, strict=True):
                rows = slice(start, start + part.n_loss_tokens)
                own = StudentForward(forward.hidden[rows], forward.head, forward.targets[rows])
                if not torch.equal(own.targets, part.student.targets().to(own.targets.device)):
                    raise ValueError(f"the rows of part {part.route.target} are not its samples' loss rows")
                out.append((part.route.target, self.loss_of(own, part, output, normaliser)))
                start = rows.stop
        if start != forward.targets.shape[0]:
            raise ValueError(f"the parts hold {start} of the micro-batch's {forward.targets.shape[0]} loss rows")
        return out

    def loss_of(self, forward: StudentForward, batch: MicroBatch, teacher: Any, normaliser: float) -> LossTerms:
        """The loss of a one-target micro-batch given the student's forward over it."""
        alone = self._one_teacher(batch, teacher)
        if alone is not None:
            name, view, output = alone
            return self.algorithms[name].loss_of(forward, view, output, normaliser)
        route = batch.route
        n = forward.hidden.shape[0]
        members, hidden, covered = [], [], []
        for name in route.members:
            member, rows, where = self._member(name, route.view(batch, name), teacher[name], n)
            members.append(member)
            hidden.append(rows)
            covered.append(where)
        weights = row_weights(route.weights, batch.student.loss_rows_per_sample(), torch.stack(covered, -1))
        kd_ratio = getattr(self.cfg, "kd_ratio")
        return ensemble_loss(forward.hidden, forward.head, forward.targets, members, hidden, weights, route.combine,
                             self.loss_cfg, kd_weight=kd_ratio, ce_weight=1.0 - kd_ratio, normaliser=normaliser)

    @staticmethod
    def _one_teacher(batch: MicroBatch, teacher: Any) -> Optional[tuple[str, MicroBatch, Any]]:
        """(teacher, the batch as it reads it, its output) when one teacher's target is the
        micro-batch's (its route is a teacher, or an ensemble putting all weight on one member:
        trained as that teacher alone would train it), else None (a true ensemble)."""
        route = batch.route
        if not route.is_ensemble:
            return route.teacher, batch, teacher
        if not isinstance(teacher, dict) or set(teacher) != set(route.members):
            raise ValueError(f"ensemble {route.target} needs one teacher output per member {list(route.members)}")
        sole = _sole_member(route.weights)
        if sole is None:
            return None
        name = route.members[sole]
        return name, route.view(batch, name), teacher[name]

    def _member(self, name: str, view: MicroBatch, output: TeacherOutput, n_rows: int):
        """(the member for the loss, its hidden states at the student's rows, the rows it covers)."""
        algorithm = self.algorithms[name]
        if not isinstance(algorithm, CrossTokenizerAlgorithm):
            output.check_rows(n_rows)
            return Member(algorithm.teacher_head), output.hidden, torch.ones(n_rows, dtype=torch.bool,
                                                                             device=output.hidden.device)
        method = algorithm.method
        rows = teacher_hidden_for(method, view.alignment, output)
        starts = view.alignment.rows(method.row_kind).student_start.to(rows.device)
        placed = rows.new_zeros(n_rows, rows.shape[-1])
        placed[starts] = rows
        covered = torch.zeros(n_rows, dtype=torch.bool, device=rows.device)
        covered[starts] = True
        return Member(method.teacher_head, carry=method.teacher_log_probs), placed, covered

    def heldout(self, batch: MicroBatch, teacher: Any, sums: TeacherSums) -> RoutedSums:
        """Held-out sums of a routed micro-batch, per member against its own teacher."""
        route = batch.route
        outputs = teacher if route.is_ensemble else {route.teacher: teacher}
        per_teacher = {
            name: sums(route.view(batch, name), outputs[name], self.algorithms[name].teacher_head, self.matches[name])
            for name in route.members
        }
        total = per_teacher[route.teacher]
        for name in route.members[1:]:  # the student's own figures once
            total = total.add(replace(per_teacher[name], ce=0.0, tokens=0, student_bytes=0))
        return RoutedSums(total, per_teacher)


def _sole_member(weights: Optional[torch.Tensor]) -> Optional[int]:
    """The member every sample of a micro-batch puts all its weight on ([n_samples, K] weights),
    or None."""
    if weights is None:
        return None
    for k in range(weights.shape[1]):
        if bool((weights[:, k] == 1).all()):
            return k
    return None
