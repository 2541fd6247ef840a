"""The reward objectives (``algorithm=reward_kd``, ``algorithm=opd``) on a tiny model: they hand the
engine the policy-gradient term their formulas say (advantages times reward_weight, the teacher's
log-ratio, the rollout engine's log-probabilities for the importance ratio), and with
reward_weight 0 reward_kd is vanilla KD bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import kdlib
from kdlib.algorithms import ALGORITHMS
from kdlib.data.batching import collate
from kdlib.data.samples import Sample, Sequence
from kdlib.losses import distillation_loss
from kdlib.losses.policy_gradient import PolicyGradient
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import lm_head_of
from kdlib.teacher_output import TeacherOutput


@pytest.fixture
def setup(tiny_llama):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = [Sample(0, Sequence([5, 6, 7, 8, 9, 10], 3), advantage=1.25),
               Sample(1, Sequence([5, 11, 12, 13], 2), advantage=-0.75)]
    batch = collate(samples, student_pad_id=0)
    n = batch.n_loss_tokens
    batch.rollout_logprobs = torch.tensor([-2.0, math.nan, -3.5, -1.0, -6.0][:n], dtype=torch.float32)
    with torch.no_grad():
        hidden = hidden_at_loss_positions(teacher, batch.student)
    return student, lm_head_of(teacher).detached(), batch, TeacherOutput(hidden=hidden)


def _algorithm(overrides, teacher_head):
    cfg = kdlib.compose(["+recipe=onpolicy", "reward=numeric", *overrides])
    return ALGORITHMS.get(cfg.algorithm.name)(cfg.algorithm, cfg.loss, teacher_head), cfg


def _loss_and_grad(student, fn):
    student.zero_grad(set_to_none=True)
    terms = fn()
    terms.loss.backward()
    return terms, {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides, kd_weight, pg", [
    (["algorithm=reward_kd", "algorithm.reward_weight=0.5", "algorithm.is_clip=1.5"], 1.0,
     lambda b: PolicyGradient(advantages=b.advantages * 0.5, rollout_logprobs=b.rollout_logprobs, is_clip=1.5)),
    (["algorithm=opd"], 0.0, lambda b: PolicyGradient(teacher_weight=1.0)),
    (["algorithm=opd", "algorithm.reward_weight=2", "algorithm.teacher_weight=0.5", "algorithm.kd_ratio=0.8"], 0.0,
     lambda b: PolicyGradient(advantages=b.advantages * 2.0, teacher_weight=0.5)),
])
def test_objectives_give_the_engine_their_policy_gradient(setup, overrides, kd_weight, pg):
    student, teacher_head, batch, teacher = setup
    algorithm, cfg = _algorithm(overrides, teacher_head)
    got, got_grad = _loss_and_grad(student, lambda: algorithm.compute_loss(student, batch, teacher, 7.0))

    def expected_terms():
        hidden = hidden_at_loss_positions(student, batch.student)
        return distillation_loss(hidden, lm_head_of(student), teacher.hidden, teacher_head, batch.student.targets(),
                                 cfg.loss, kd_weight=kd_weight * cfg.algorithm.kd_ratio,
                                 ce_weight=1.0 - cfg.algorithm.kd_ratio, normaliser=7.0, pg=pg(batch))

    want, want_grad = _loss_and_grad(student, expected_terms)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.pg_sum, want.pg_sum)
    assert float(got.pg_sum) != 0.0 and float(got.kd_sum) > 0.0  # the KD divergence is reported either way
    assert got_grad.keys() == want_grad.keys() and all(torch.equal(got_grad[k], want_grad[k]) for k in got_grad)


def test_reward_weight_zero_is_vanilla_bit_for_bit(setup):
    student, teacher_head, batch, teacher = setup
    reward_kd, _ = _algorithm(["algorithm=reward_kd", "algorithm.reward_weight=0"], teacher_head)
    vanilla, _ = _algorithm(["algorithm=vanilla"], teacher_head)
    got, got_grad = _loss_and_grad(student, lambda: reward_kd.compute_loss(student, batch, teacher, 5.0))
    want, want_grad = _loss_and_grad(student, lambda: vanilla.compute_loss(student, batch, teacher, 5.0))
    assert torch.equal(got.loss, want.loss) and got.pg_sum is None
    assert all(torch.equal(got_grad[k], want_grad[k]) for k in want_grad)
    weighted, _ = _algorithm(["algorithm=reward_kd"], teacher_head)
    assert not torch.equal(weighted.compute_loss(student, batch, teacher, 5.0).loss, want.loss)


def test_importance_ratio_needs_rollouts_at_temperature_one():
    with pytest.raises(kdlib.ConfigError, match=r"^algorithm.is_clip compares .* set rollout.temperature=1, not 0.7"):
        kdlib.compose(["+recipe=onpolicy", "reward=numeric", "algorithm=reward_kd", "algorithm.is_clip=2",
                       "rollout.temperature=0.7"])
