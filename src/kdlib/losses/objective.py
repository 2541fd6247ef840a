"""The training objective from hidden states: ``ce_weight * CE + kd_weight * KD``, summed.

Both the student's and the teacher's logits are recomputed here from final hidden states and the
two language-model heads, which is the point of hidden-state KD. ``distillation_loss`` is the one
entry point the algorithms call; it dispatches on ``LossConfig.implementation`` between the fused,
chunked path (``kdlib.losses.fused``) and the naive reference path below, which materialises the
logits of all N tokens and exists to check the fused one.

Conventions shared by both paths:
- teacher and student distributions are compared on the common vocabulary ``min(Vs, Vt)`` (the
  extra rows of the larger head are padding, e.g. Qwen's 151936 vs 152064);
- the divergence sees float32 logits divided by ``temperature`` and is optionally multiplied by
  ``temperature ** 2``; the CE term always uses the untempered student logits;
- sums over tokens are returned, divided by ``normaliser`` (the number of loss tokens in the whole
  optimizer step), so gradient accumulation and data parallelism leave the objective unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from kdlib.config.schema import LossConfig, LossImplementation
from kdlib.losses import target_logprobs
from kdlib.losses.policy_gradient import PolicyGradient
from kdlib.losses.registry import LOSSES, loss_params
from kdlib.losses.terms import LossTerms
from kdlib.models.head import LMHead


def per_token_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    **params: Any,
) -> torch.Tensor:
    """Per-token divergence ``name`` with kdlib's conventions (fp32, temperature, common vocab)."""
    fn = LOSSES.get(name)
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :vocab].float() / temperature
    t = teacher_logits[..., :vocab].float() / temperature
    out = fn(s, t, **params)
    if scale_by_temperature_squared:
        out = out * (temperature**2)
    return out


def get(name: str) -> Callable[..., torch.Tensor]:
    """The public per-token loss ``(student_logits, teacher_logits, **params) -> [N]``.

    ``params`` are the divergence's own parameters plus ``temperature`` and
    ``scale_by_temperature_squared``; unknown names list the registered ones.
    """
    LOSSES.entry(name)  # fail now, with the list of names, rather than at the first call

    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **params: Any) -> torch.Tensor:
        return per_token_divergence(name, student_logits, teacher_logits, **params)

    loss.__name__ = f"kdlib_loss_{name}"
    loss.__doc__ = LOSSES.get(name).__doc__
    return loss


def distillation_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: Optional[torch.Tensor],
    teacher_head: Optional[LMHead],
    targets: Optional[torch.Tensor],
    cfg: LossConfig,
    *,
    kd_weight: float,
    ce_weight: float,
    normaliser: float,
    pg: Optional[PolicyGradient] = None,
) -> LossTerms:
    """``(kd_weight * KD + ce_weight * CE [+ PG]) / normaliser`` for N tokens, from hidden states.

    ``student_hidden`` is [N, Hs] (with autograd), ``teacher_hidden`` [N, Ht] or None (no KD term),
    ``targets`` [N] the next-token ids or None (no CE term). Both terms are reported whenever
    their inputs are given, even with a zero weight, so the CE of a pure-KD run is still logged.
    ``pg``: a policy-gradient term on the targets, ``-sum_t w_t log p(y_t)``
    (:mod:`kdlib.losses.policy_gradient`), reported as ``pg_sum``.
    """
    if teacher_hidden is not None and teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(
            f"teacher sent hidden states for {teacher_hidden.shape[0]} tokens, "
            f"the student has {student_hidden.shape[0]} loss tokens"
        )
    with torch.autocast(student_hidden.device.type, enabled=False):  # the loss is never autocast
        return _dispatch(
            student_hidden, student_head, teacher_hidden, teacher_head, targets, cfg,
            kd_weight=kd_weight, ce_weight=ce_weight, normaliser=normaliser, pg=pg,
        )


def _dispatch(student_hidden, student_head, teacher_hidden, teacher_head, targets, cfg, **weights) -> LossTerms:
    if cfg.implementation is LossImplementation.fused:
        from kdlib.losses.fused import fused_distillation_loss

        return fused_distillation_loss(
            student_hidden, student_head, teacher_hidden, teacher_head, targets, cfg, **weights
        )
    return naive_distillation_loss(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, cfg, **weights
    )


def naive_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: Optional[torch.Tensor],
    teacher_head: Optional[LMHead],
    targets: Optional[torch.Tensor],
    cfg: LossConfig,
    *,
    kd_weight: float,
    ce_weight: float,
    normaliser: float,
    pg: Optional[PolicyGradient] = None,
) -> LossTerms:
    """Reference path: materialise [N, V] logits for both models, then the terms."""
    n = student_hidden.shape[0]
    zero = student_hidden.new_zeros((), dtype=torch.float32)
    student_logits = student_head.logits(student_hidden).float()
    loss = zero
    kd_sum = zero
    ce_sum = zero
    teacher_logits = None
    if teacher_hidden is not None:
        assert teacher_head is not None, "a teacher hidden state needs the teacher head"
        with torch.no_grad():
            teacher_logits = teacher_head.logits(teacher_hidden).float()
        per_token = per_token_divergence(
            cfg.name, student_logits, teacher_logits,
            temperature=cfg.temperature,
            scale_by_temperature_squared=cfg.scale_by_temperature_squared,
            **loss_params(cfg),
        )
        kd = per_token.sum()
        loss = loss + kd_weight * kd
        kd_sum = kd.detach()
    if targets is not None:
        target_logprobs.observe_logits(student_logits, targets)
        ce = F.cross_entropy(student_logits, targets, reduction="sum")
        loss = loss + ce_weight * ce
        ce_sum = ce.detach()
    pg_sum = None
    if pg is not None:
        pg_value = naive_policy_gradient(student_logits, teacher_logits, targets, pg)
        loss = loss + pg_value
        pg_sum = pg_value.detach()
    return LossTerms(loss=loss / normaliser, kd_sum=kd_sum, ce_sum=ce_sum, n_tokens=n, pg_sum=pg_sum)


def naive_policy_gradient(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                          targets: torch.Tensor, pg: PolicyGradient) -> torch.Tensor:
    """``-sum_t w_t log p_student(y_t)`` from full logits (temperature 1, common vocabulary for the
    teacher's log-probabilities), with autograd through the student's log-probabilities only."""
    log_p = F.log_softmax(student_logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    teacher_lp = None
    if pg.needs_teacher:
        vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
        teacher_lp = F.log_softmax(teacher_logits[:, :vocab], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    w = pg.weights(slice(0, targets.shape[0]), log_p.detach(), teacher_lp)
    return -(w * log_p).sum()
