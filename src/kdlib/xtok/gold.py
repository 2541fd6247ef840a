"""``algorithm=gold``: TRL GOLD's hybrid loss, a matched-vocabulary divergence plus ULD on the rest.

GOLD ("Unlocking On-Policy Distillation for Any Model Family", Patiño et al. 2025, TRL's
``GOLDTrainer`` with ``use_uld_loss`` and ``uld_use_hybrid_loss``) works on every byte-aligned
group. Each side's group distribution is merged by the chain rule
(:mod:`kdlib.xtok.distributions`): m(v) = P(v | prefix) * c, with c the product of the
probabilities of the group's later tokens. The vocabulary is split into the matched sub-vocabulary
M (:mod:`kdlib.xtok.vocab`) and the rest:

    KD = w_M * D(P_M || Q_M) + w_U * sorted_L1(m_t[unmatched], m_s[unmatched])

- D is a divergence of kdlib's registry (``loss=kl|jsd|...``; TRL uses its generalised JSD with
  ``beta``) between the distributions over "matched token v first, then the group's actual
  continuation" for v in M, plus one outcome "anything else" holding the remaining mass
  1 - c * P(M | prefix). Both are proper distributions, the chain-rule product matters, and with
  identical tokenizers (M = the vocabulary, every group 1:1) the extra outcome has zero mass on
  both sides and D is exactly vanilla KD. TRL instead applies its JSD formula to the unnormalised
  matched probabilities. When the extra outcome is impossible on one side only (a side whose
  vocabulary is entirely matched, at a one-token group) it gets ``rest_floor`` probability
  there, so D stays finite.
- sorted_L1 is ULD on the unmatched entries of the merged vectors (head padding rows included).
- w_M is the matched fraction |M| / |teacher vocabulary| and w_U = 1 - w_M unless given (TRL
  ``uld_hybrid_matched_weight`` / ``uld_hybrid_unmatched_weight``).

Temperature (``loss.temperature``) applies to both sides' softmax before merging; T^2 scaling
applies to D. This file holds the method whole: its config, its registered algorithm and its
per-chunk term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig
from kdlib.config.schema import LossConfig
from kdlib.models.head import LMHead
from kdlib.xtok.distributions import (
    group_log_probs,
    log1mexp_safe,
    logaddexp_safe,
    logsumexp_or_neg_inf,
    sorted_l1,
)
from kdlib.xtok.groups import RowKind
from kdlib.xtok.method import ChunkInputs, CrossTokenizerLoss, divergence
from kdlib.xtok.vocab import VocabMatch


@dataclass
class GOLDConfig(CrossTokenizerConfig):
    """``algorithm=gold`` and its options (the divergence itself comes from the loss config)."""

    name: str = "gold"
    # Weight of the matched-vocabulary divergence; None = the matched fraction of the teacher's
    # vocabulary (TRL uld_hybrid_matched_weight).
    matched_weight: Optional[float] = None
    # Weight of ULD on the unmatched rest; None = 1 - matched weight (TRL uld_hybrid_unmatched_weight).
    unmatched_weight: Optional[float] = None
    # Probability given to the "anything else" outcome on a side where it is impossible while the
    # other side has it (keeps forward and reverse KL finite).
    rest_floor: float = 1e-12

    def check(self) -> None:
        super().check()
        for name in ("matched_weight", "unmatched_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"gold {name} must be >= 0, got {value}")
        if not 0.0 < self.rest_floor < 1.0:
            raise ValueError(f"gold rest_floor must be in (0, 1), got {self.rest_floor}")


class GOLDLoss(CrossTokenizerLoss):
    """GOLD's hybrid of a matched-vocabulary divergence and ULD on chain-rule merged groups, plus CE."""

    row_kind = RowKind.group_rows

    def __init__(
        self, teacher_head: LMHead, match: VocabMatch, loss: LossConfig, options: GOLDConfig = GOLDConfig(),
        **weights,
    ) -> None:
        super().__init__(teacher_head, **weights)
        options.check()
        self.loss = loss
        # The divergence on log-probabilities that are already tempered.
        self.untempered_loss = replace(loss, temperature=1.0, scale_by_temperature_squared=False)
        self.options = options
        self.match = match.to(self.teacher_head.weight.device)
        matched = options.matched_weight if options.matched_weight is not None else match.matched_fraction
        unmatched = options.unmatched_weight if options.unmatched_weight is not None else 1.0 - matched
        if unmatched < 0:
            raise ValueError(f"gold: matched_weight {matched} > 1 leaves a negative unmatched weight")
        self.matched_weight, self.unmatched_weight = float(matched), float(unmatched)
        self.teacher_unmatched = self.match.unmatched("teacher", self.teacher_head.vocab_size)
        self._student_unmatched: dict[int, torch.Tensor] = {}

    def student_unmatched(self, rows: int) -> torch.Tensor:
        if rows not in self._student_unmatched:
            self._student_unmatched[rows] = self.match.unmatched("student", rows)
        return self._student_unmatched[rows]

    def kd_sum(self, chunk: ChunkInputs) -> torch.Tensor:
        temperature = self.loss.temperature
        s_merged, s_log_c, s_first = group_log_probs(
            chunk.student_logits, chunk.student_ids, chunk.student_start, chunk.student_len, temperature
        )
        t_merged, t_log_c, t_first = group_log_probs(
            self.teacher_logits(chunk), chunk.teacher_ids, chunk.teacher_start, chunk.teacher_len, temperature
        )
        s_unmatched = self.student_unmatched(s_merged.shape[-1])
        s_rest = _rest_log_mass(s_log_c, s_first[:, s_unmatched])
        t_rest = _rest_log_mass(t_log_c, t_first[:, self.teacher_unmatched])
        floor = math.log(self.options.rest_floor)
        s_rest, t_rest = _floor_one_sided(s_rest, t_rest, floor), _floor_one_sided(t_rest, s_rest, floor)
        student = torch.cat([s_merged[:, self.match.student_ids], s_rest.unsqueeze(-1)], -1)
        teacher = torch.cat([t_merged[:, self.match.teacher_ids], t_rest.unsqueeze(-1)], -1)
        matched = divergence(self.untempered_loss, student, teacher)
        if self.loss.scale_by_temperature_squared:
            matched = matched * temperature**2
        rest = sorted_l1(s_merged[:, s_unmatched].exp(), t_merged[:, self.teacher_unmatched].exp())
        return (self.matched_weight * matched + self.unmatched_weight * rest).sum()


@register_algorithm("gold", config=GOLDConfig)
class GOLD(CrossTokenizerAlgorithm):
    loss_cls = GOLDLoss

    def build_method(self, student_head, match, weights) -> GOLDLoss:
        return GOLDLoss(self.teacher_head, match, self.loss_cfg, self.cfg, **weights)


def _rest_log_mass(log_c: torch.Tensor, unmatched_first: torch.Tensor) -> torch.Tensor:
    """log(c * P(unmatched | prefix) + 1 - c): the mass of every outcome but "matched v, then the
    group's continuation"."""
    return logaddexp_safe(log_c + logsumexp_or_neg_inf(unmatched_first), log1mexp_safe(log_c))


def _floor_one_sided(rest: torch.Tensor, other: torch.Tensor, floor: float) -> torch.Tensor:
    """``rest`` raised to ``floor`` where it is below it, unless the other side's is -inf too."""
    both_impossible = torch.isinf(rest) & torch.isinf(other)
    return torch.where(both_impossible, rest, rest.clamp_min(floor))
