"""The policy-gradient term on the chunked engine against float64 references of its formula.

``PG = -sum_t w_t log p(y_t)`` with ``w_t = (a_t + c (log p_T(y_t) - log p_S(y_t))) rho_t``
(:mod:`kdlib.losses.policy_gradient`): the weights against values computed by hand, the term's
value and its gradients (hidden states, head) against a float64 autograd reference written from
the formula, combined with the KD and CE terms, for several chunk sizes; the fused path against the
naive one; on-policy distillation's advantage against the reverse-KL single-sample estimate.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdlib.config.schema import LossImplementation
from kdlib.losses import distillation_loss
from kdlib.losses.policy_gradient import PolicyGradient, importance_ratio
from kdlib.losses.registry import LOSSES
from kdlib.models.head import LMHead


def _logsoftmax_at(z: list[float], y: int) -> float:
    return z[y] - math.log(sum(math.exp(v) for v in z))


def test_weights_against_hand_computed_values():
    # two tokens; student log-probs -0.5, -2.0; teacher -0.1, -3.0; advantages 1.5, -0.5
    lp_s = torch.tensor([-0.5, -2.0], dtype=torch.float64)
    lp_t = torch.tensor([-0.1, -3.0], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    assert PolicyGradient(advantages=adv).weights(slice(0, 2), lp_s).tolist() == [1.5, -0.5]
    opd = PolicyGradient(teacher_weight=1.0).weights(slice(0, 2), lp_s, lp_t)
    torch.testing.assert_close(opd, torch.tensor([0.4, -1.0], dtype=torch.float64), rtol=0, atol=1e-15)
    both = PolicyGradient(advantages=adv, teacher_weight=0.5).weights(slice(0, 2), lp_s, lp_t)
    torch.testing.assert_close(both, torch.tensor([1.5 + 0.2, -0.5 - 0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    # importance ratio: rollout log-probs -0.7 (ratio e^0.2 = 1.2214) and -2.5 (e^0.5 = 1.6487 -> clip 1.3)
    rollout = torch.tensor([-0.7, -2.5], dtype=torch.float64)
    clipped = PolicyGradient(advantages=adv, rollout_logprobs=rollout, is_clip=1.3).weights(slice(0, 2), lp_s)
    torch.testing.assert_close(clipped, torch.tensor([1.5 * math.exp(0.2), -0.5 * 1.3], dtype=torch.float64))
    # a token without an engine log-prob (NaN) keeps ratio 1; rows are a slice of the batch
    rollout_nan = torch.tensor([9.0, float("nan"), -2.5], dtype=torch.float64)
    assert importance_ratio(lp_s, rollout_nan[1:], 10.0).tolist() == [1.0, math.exp(0.5)]


def test_opd_advantage_is_the_negated_reverse_kl_estimate():
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 11, generator=gen), torch.randn(6, 11, generator=gen)
    y = torch.randint(0, 11, (6,), generator=gen)
    lq = torch.log_softmax(student.double(), -1).gather(-1, y[:, None]).squeeze(-1)
    lp = torch.log_softmax(teacher.double(), -1).gather(-1, y[:, None]).squeeze(-1)
    k1 = lq - lp  # the single-sample estimate of KL(q || p) at the sampled token
    advantage = PolicyGradient(teacher_weight=1.0).weights(slice(0, 6), lq, lp)
    torch.testing.assert_close(advantage, -k1, rtol=0, atol=0)
    assert advantage.abs().sum() > 0


def _reference(hs, ws, ht, wt, y, loss_name, kd_w, ce_w, adv, c, rollout, clip):
    """float64 autograd of kd_w * sum KD + ce_w * sum CE - sum_t w_t log p(y_t), written out."""
    zs = hs @ ws.t()
    zt = (ht @ wt.t()).detach()
    vocab = min(zs.shape[1], zt.shape[1])
    kd = LOSSES.get(loss_name)(zs[:, :vocab], zt[:, :vocab]).sum()
    log_p = torch.log_softmax(zs, -1).gather(-1, y[:, None]).squeeze(-1)
    ce = -log_p.sum()
    lp_s = log_p.detach()
    lp_t = torch.log_softmax(zt[:, :vocab], -1).gather(-1, y[:, None]).squeeze(-1)
    w = torch.zeros_like(lp_s) if adv is None else adv.clone()
    w = w + c * (lp_t - lp_s)
    if clip is not None:
        rho = torch.exp(lp_s - rollout).clamp(max=clip)
        w = w * torch.where(torch.isnan(rollout), torch.ones_like(rho), rho)
    pg = -(w * log_p).sum()
    return kd_w * kd + ce_w * ce + pg, kd.detach(), ce.detach(), pg.detach()


CASES = [  # (loss, kd_weight, ce_weight, advantages?, teacher coefficient, is_clip)
    ("rkl", 1.0, 0.0, True, 0.0, None),  # reward_kd, the recipe's objective
    ("rkl", 0.0, 0.0, False, 1.0, None),  # opd
    ("rkl", 0.0, 0.25, True, 0.7, 1.2),  # opd + task advantage + CE + truncated IS
    ("kl", 0.6, 0.4, True, 0.0, 2.0),  # reward_kd with vanilla's kd_ratio 0.6 and IS
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-kd{c[1]}-ce{c[2]}-c{c[4]}-clip{c[5]}" for c in CASES])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_fused_term_against_float64_reference(case, chunk):
    loss_name, kd_w, ce_w, with_adv, c, clip = case
    gen = torch.Generator().manual_seed(7)
    n, h, vs, vt = 9, 5, 13, 12  # different vocabularies: the teacher's log-probs use the common 12
    hs = torch.randn(n, h, dtype=torch.float64, generator=gen)
    ws = torch.randn(vs, h, dtype=torch.float64, generator=gen)
    ht = torch.randn(n, h, dtype=torch.float64, generator=gen)
    wt = torch.randn(vt, h, dtype=torch.float64, generator=gen)
    y = torch.randint(0, vt, (n,), generator=gen)
    adv = torch.randn(n, dtype=torch.float64, generator=gen) if with_adv else None
    rollout = torch.randn(n, dtype=torch.float64, generator=gen) - 2.0
    rollout[3] = float("nan")
    pg = PolicyGradient(advantages=adv, teacher_weight=c, rollout_logprobs=rollout, is_clip=clip)

    ref_h, ref_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    total, kd, ce, pg_sum = _reference(ref_h, ref_w, ht, wt, y, loss_name, kd_w, ce_w, adv, c, rollout, clip)
    (total / 3.0).backward()
    assert pg_sum.abs() > 1e-3  # the term is there

    from kdlib.config.schema import LossConfig

    cfg = LossConfig(name=loss_name, chunk_size=chunk, implementation=LossImplementation.fused)
    got_h, got_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    terms = distillation_loss(got_h, LMHead(got_w), ht, LMHead(wt), y, cfg, kd_weight=kd_w, ce_weight=ce_w,
                              normaliser=3.0, pg=pg)
    terms.loss.backward()
    torch.testing.assert_close(terms.loss, total.detach() / 3.0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.kd_sum, kd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.ce_sum, ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.pg_sum, pg_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_h.grad, ref_h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_w.grad, ref_w.grad, rtol=1e-10, atol=1e-12)


def test_fused_equals_naive_in_float32():
    from kdlib.config.schema import LossConfig

    gen = torch.Generator().manual_seed(11)
    n, h, v = 20, 8, 30
    hs, ws = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    ht, wt = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    y = torch.randint(0, v, (n,), generator=gen)
    pg = PolicyGradient(advantages=torch.randn(n, generator=gen), teacher_weight=0.5)
    out = {}
    for impl in (LossImplementation.fused, LossImplementation.naive):
        hid, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        cfg = LossConfig(name="rkl", chunk_size=7, implementation=impl)
        terms = distillation_loss(hid, LMHead(w), ht, LMHead(wt), y, cfg, kd_weight=0.5, ce_weight=0.0,
                                  normaliser=float(n), pg=pg)
        terms.loss.backward()
        out[impl] = (terms, hid.grad, w.grad)
    fused, naive = out[LossImplementation.fused], out[LossImplementation.naive]
    for a, b in [(fused[0].loss, naive[0].loss), (fused[0].pg_sum, naive[0].pg_sum), (fused[1], naive[1]),
                 (fused[2], naive[2])]:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_without_a_term_nothing_changes():
    """No PolicyGradient: the same numbers and no pg_sum (the KD-only path is untouched)."""
    from kdlib.config.schema import LossConfig

    gen = torch.Generator().manual_seed(5)
    hs, ws = torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen)
    ht, wt = torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen)
    y = torch.randint(0, 9, (6,), generator=gen)
    terms = distillation_loss(hs, LMHead(ws), ht, LMHead(wt), y, LossConfig(name="rkl"), kd_weight=1.0,
                              ce_weight=0.0, normaliser=6.0)
    assert terms.pg_sum is None
    zero = distillation_loss(hs, LMHead(ws), ht, LMHead(wt), y, LossConfig(name="rkl"), kd_weight=1.0,
                             ce_weight=0.0, normaliser=6.0, pg=PolicyGradient(advantages=torch.zeros(6)))
    assert torch.equal(zero.loss, terms.loss) and float(zero.pg_sum) == 0.0
