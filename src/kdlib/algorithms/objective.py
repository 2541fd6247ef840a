"""StudentObjective: the student model and its algorithm as one ``nn.Module``.

Every student computation (training loss, held-out sums) goes through this module's ``forward``.
That makes it the natural root for FSDP2: the root gathers the parameters outside the decoder
layers (embeddings, final norm, the head the fused loss reads directly) for the whole computation
and reduces their gradients afterwards, without the algorithm knowing about sharding. The
algorithm's own trainable modules (DSKD's projectors) are registered here as well
(``algorithm_modules``), so the optimizer, FSDP2 and training checkpoints see them like the
student's parameters; the exported student is ``model`` alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdlib.algorithms.base import Algorithm
from kdlib.algorithms.routed import RoutedLoss, RoutedSums
from kdlib.batch import MicroBatch
from kdlib.teacher_output import TeacherOutput
from kdlib.evaluation import HeldoutSums, cross_tokenizer_heldout_sums, heldout_sums, signal_heldout_sums
from kdlib.losses import LossTerms, target_logprobs
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import LMHead, lm_head_of
from kdlib.rollout_agreement import AgreementSums
from kdlib.xtok.vocab import VocabMatch


class StudentObjective(nn.Module):
    def __init__(
        self, model: nn.Module, algorithm: Algorithm, *, device_type: str, autocast: bool = False, chunk_size: int = 256,
        vocab_match: Optional[VocabMatch] = None, routes: Optional[RoutedLoss] = None, rollout_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.algorithm = algorithm
        # Several teachers: the algorithm of each and the ensembles' loss, for routed micro-batches.
        self.routes = routes
        self.algorithm_modules = nn.ModuleDict(algorithm.modules() if routes is None else routes.modules())
        # Across tokenizers: the matched vocabulary (top-1 agreement at 1:1 groups).
        self.vocab_match = vocab_match
        self.device_type = device_type  # where compute runs (parameters may be offloaded)
        self.autocast = autocast
        self.chunk_size = chunk_size
        # On-policy: the trainer's log-probabilities of sampled tokens are taken at this temperature.
        self.rollout_temperature = rollout_temperature

    def forward(
        self,
        batch: MicroBatch,
        teacher: Optional[TeacherOutput],
        normaliser: float,
        weight: float = 1.0,
        evaluate: bool = False,
    ):
        """Training: (loss, kd_sum, ce_sum, pg_sum) tensors, scaled by ``weight`` (0 for padding
        batches; pg_sum 0 without a policy-gradient term); for sampled tokens
        (``batch.rollout_logprobs``) how far the rollout engine's log-probabilities are from the
        trainer's (:class:`AgreementSums`, else None); and for a routed batch each target's
        (loss sum, kd sum) as floats, scaled by ``weight`` (else None).
        ``evaluate=True``: the held-out sums of the batch (no gradients)."""
        if evaluate:
            return self._evaluate(batch, teacher)
        sampled = batch.rollout_logprobs
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            if sampled is None:
                terms, agreement = self._loss(batch, teacher, normaliser), None
            else:
                with target_logprobs.recording(self.rollout_temperature) as recorded:
                    terms = self._loss(batch, teacher, normaliser)
                agreement = AgreementSums.of(recorded.rows(sampled.numel()), sampled)
        terms, by_target = terms
        if by_target is not None:
            by_target = {target: (loss * weight * normaliser, kd * weight) for target, (loss, kd) in by_target.items()}
        pg = terms.pg_sum if terms.pg_sum is not None else torch.zeros_like(terms.ce_sum)
        return terms.loss * weight, terms.kd_sum * weight, terms.ce_sum * weight, pg * weight, agreement, by_target

    def _loss(self, batch: MicroBatch, teacher, normaliser: float) -> tuple[LossTerms, Optional[dict]]:
        """The batch's loss terms and, routed, each target's (loss, kd sum) as floats."""
        if self.routes is None or batch.route is None:
            return self.algorithm.compute_loss(self.model, batch, teacher, normaliser), None
        parts = self.routes.part_losses(self.model, batch, teacher, normaliser)
        by_target: dict[str, tuple[float, float]] = {}
        for target, part in parts:
            loss, kd = by_target.get(target, (0.0, 0.0))
            by_target[target] = (loss + float(part.loss.detach()), kd + float(part.kd_sum))
        return LossTerms.total([part for _, part in parts]), by_target

    def _evaluate(self, batch: MicroBatch, teacher: Optional[TeacherOutput]) -> HeldoutSums | RoutedSums:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = hidden_at_loss_positions(self.model, batch.student)
        head = lm_head_of(self.model)

        def sums(view: MicroBatch, output: Optional[TeacherOutput], teacher_head: Optional[LMHead],
                 match: Optional[VocabMatch]) -> HeldoutSums:
            return self._sums(view, output, hidden, head, teacher_head, match)

        if self.routes is not None and batch.route is not None:
            return self.routes.heldout(batch, teacher, sums)
        return sums(batch, teacher, self.algorithm.teacher_head, self.vocab_match)

    def _sums(self, batch: MicroBatch, teacher: Optional[TeacherOutput], hidden: torch.Tensor, head: LMHead,
              teacher_head: Optional[LMHead], match: Optional[VocabMatch]) -> HeldoutSums:
        if teacher is not None and teacher.signal != "hidden":
            sums = signal_heldout_sums(hidden, head, teacher, batch.student.targets(), chunk_size=self.chunk_size)
        elif teacher is not None and batch.alignment is not None and match is not None:
            sums = cross_tokenizer_heldout_sums(
                hidden, head, teacher.hidden, teacher_head, batch.alignment, match, chunk_size=self.chunk_size,
            )
        else:
            sums = heldout_sums(
                hidden, head, None if teacher is None else teacher.hidden, teacher_head,
                batch.student.targets(), chunk_size=self.chunk_size,
            )
        if batch.response_bytes is not None:
            sums.student_bytes = int(batch.response_bytes.sum())
            if sums.teacher_tokens:
                teacher_bytes = batch.teacher_response_bytes if batch.teacher_response_bytes is not None else batch.response_bytes
                sums.teacher_bytes = int(teacher_bytes.sum())
        return sums
