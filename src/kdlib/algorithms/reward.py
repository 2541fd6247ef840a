"""On-policy objectives with a task reward: KD plus policy gradient, and distillation as policy gradient.

Both read the micro-batch's per-token task advantages (``MicroBatch.advantages``: each rollout's
group-normalised reward, :mod:`kdlib.rewards.advantages`) and add a policy-gradient term to the
chunked loss (:mod:`kdlib.losses.policy_gradient`); N is the step's loss tokens (the normaliser):

- ``reward_kd``: ``kd_ratio * KD + (1 - kd_ratio) * CE - (reward_weight / N) sum_t A_t rho_t
  log p(y_t)``, KD the configured divergence (reverse KL in the on-policy recipe) per token,
  averaged over N like every term. With ``reward_weight=0`` it is ``vanilla``, computed by the
  same code (bit for bit).
- ``opd`` (on-policy distillation, Thinking Machines 2025): the KD term is replaced by its
  policy-gradient form, ``-(1/N) sum_t [teacher_weight * (log p_T(y_t) - log p_S(y_t))
  + reward_weight * A_t] rho_t log p_S(y_t)`` plus ``(1 - kd_ratio) * CE``; the divergence is still
  computed and logged (``kd_loss``), with weight 0. ``teacher_weight=0, reward_weight=1`` is the
  task reward alone (GRPO's objective without its clipping or KL penalty).

``rho_t`` is 1, or with ``is_clip`` the truncated importance ratio of the trainer's and the
rollout engine's probabilities of the sampled token (``MicroBatch.rollout_logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


from kdlib.algorithms.base import StudentForward, register_algorithm
from kdlib.algorithms.vanilla import VanillaKD, VanillaKDConfig
from kdlib.batch import MicroBatch
from kdlib.losses import LossTerms, distillation_loss
from kdlib.losses.policy_gradient import PolicyGradient
from kdlib.teacher_output import TeacherOutput


@dataclass
class RewardKDConfig(VanillaKDConfig):
    name: str = "reward_kd"
    # Weight of the policy-gradient term on the task reward's advantages (0: vanilla KD exactly).
    reward_weight: float = 1.0
    # Truncated importance sampling for rollouts from a lagging engine: cap of the per-token
    # ratio p_train / p_rollout that multiplies the policy-gradient weight; null: no ratio.
    is_clip: Optional[float] = None

    def check(self) -> None:
        super().check()
        if self.reward_weight < 0:
            raise ValueError(f"reward_weight must be >= 0, got {self.reward_weight}")
        if self.is_clip is not None and self.is_clip <= 0:
            raise ValueError(f"is_clip must be > 0 (or null), got {self.is_clip}")


@dataclass
class OPDConfig(RewardKDConfig):
    name: str = "opd"
    # Added to the teacher's log-ratio advantage: reward_weight x the task advantage (0: none).
    reward_weight: float = 0.0
    # Coefficient of the teacher's per-token log-ratio advantage log p_T(y) - log p_S(y) (0: off).
    teacher_weight: float = 1.0

    def check(self) -> None:
        super().check()
        if self.teacher_weight < 0:
            raise ValueError(f"teacher_weight must be >= 0, got {self.teacher_weight}")


@register_algorithm("reward_kd", config=RewardKDConfig)
class RewardKD(VanillaKD):
    cfg: RewardKDConfig
    signals = ("hidden",)
    policy_gradient_term = True
    # Whether the KD divergence trains (reward_kd) or is only reported (opd: its PG form trains).
    kd_trains = True

    def teacher_weight(self) -> float:
        """Coefficient of the teacher's log-ratio advantage in the PG weights (opd only)."""
        return 0.0

    def policy_gradient(self, batch: MicroBatch) -> Optional[PolicyGradient]:
        """This micro-batch's PG term, or None when it has none (no reward, no teacher ratio)."""
        cfg = self.cfg
        advantages = None
        if cfg.reward_weight and batch.advantages is not None:
            advantages = batch.advantages * cfg.reward_weight
        teacher_weight = self.teacher_weight()
        if advantages is None and not teacher_weight:
            return None
        return PolicyGradient(
            advantages=advantages, teacher_weight=teacher_weight,
            rollout_logprobs=batch.rollout_logprobs if cfg.is_clip is not None else None, is_clip=cfg.is_clip,
        )

    def loss_of(
        self, fwd: StudentForward, batch: MicroBatch, teacher: Optional[TeacherOutput], normaliser: float
    ) -> LossTerms:
        pg = self.policy_gradient(batch)
        if pg is None and self.kd_trains:  # no reward in this batch: vanilla KD, the same code
            return super().loss_of(fwd, batch, teacher, normaliser)
        if teacher is None or teacher.signal != "hidden" or self.teacher_head is None:
            raise ValueError(f"algorithm {self.cfg.name} needs the teacher's hidden states and head")
        kd_weight = self.cfg.kd_ratio if self.kd_trains else 0.0
        return distillation_loss(fwd.hidden, fwd.head, teacher.hidden, self.teacher_head, fwd.targets, self.loss_cfg,
                                 kd_weight=kd_weight, ce_weight=1.0 - self.cfg.kd_ratio, normaliser=normaliser, pg=pg)


@register_algorithm("opd", config=OPDConfig)
class OnPolicyDistillation(RewardKD):
    cfg: OPDConfig
    kd_trains = False

    def teacher_weight(self) -> float:
        return self.cfg.teacher_weight
