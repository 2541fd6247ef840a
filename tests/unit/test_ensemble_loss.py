"""Ensembles of teachers (kdlib.losses.ensemble) against float64 references of their formulas.

The combined target of members k with row weights v_k is the probability mixture sum_k v_k P_k or
the normalised product prod_k P_k^v_k (docs/multi_teacher.md); the KD term is the registered
divergence between that target and the student's distribution, on the chunked engine. The fused
ensemble must give the float64 value and gradients for any weights, rows no member covers must get
CE only, and weights that put everything on one member must give exactly (bit for bit) that
member's one-teacher loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import LOSSES
from kdlib.losses.ensemble import Member, combine_log_probs, ensemble_loss, row_weights
from kdlib.losses.fused import fused_distillation_loss
from kdlib.models.head import LMHead

N, HS, HT, V = 11, 8, 6, 13


def loss_cfg(name: str, **fields):
    return LOSSES.entry(name).config_cls(name=name, **fields)


def setup(seed: int = 0, vocab_b: int = V):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(N, HS, generator=g, requires_grad=True)
    student_head = LMHead(torch.randn(V, HS, generator=g, requires_grad=True))
    heads = [LMHead(torch.randn(V, HT, generator=g)), LMHead(torch.randn(vocab_b, HT + 2, generator=g))]
    hidden = [torch.randn(N, HT, generator=g), torch.randn(N, HT + 2, generator=g)]
    targets = torch.randint(0, V, (N,), generator=g)
    return student_hidden, student_head, heads, hidden, targets


def reference(student_hidden, student_head, heads, hidden, targets, weights, combine, cfg, kd_weight, ce_weight):
    """The same objective in float64 with full logits: (total, kd_sum, ce_sum)."""
    columns = min(student_head.vocab_size, *(h.vocab_size for h in heads))
    s = student_hidden.double() @ student_head.weight.double().t()
    t_s = s[:, :columns] / cfg.temperature
    w = weights.double()
    log_p = torch.stack([F.log_softmax((x.double() @ h.weight.double().t())[:, :columns] / cfg.temperature, -1)
                         for h, x in zip(heads, hidden)])  # [K, N, V]
    if combine == "mixture":
        target = torch.log((w.t().unsqueeze(-1) * log_p.exp()).sum(0))
    else:
        target = F.log_softmax((w.t().unsqueeze(-1) * log_p).sum(0), -1)
    covered = w.sum(-1) > 0
    params = {k: getattr(cfg, k) for k in ("beta",) if hasattr(cfg, k)}
    per_row = LOSSES.get(cfg.name)(t_s[covered], target[covered], **params)
    kd = per_row.sum() * (cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0)
    ce = F.cross_entropy(s, targets, reduction="sum")
    return kd_weight * kd + ce_weight * ce, kd, ce


def random_weights(seed: int) -> torch.Tensor:
    """Row weights with every case: mixed, all on member 0, all on member 1, no member (CE only)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(N, 2, generator=g, dtype=torch.float64)
    w[2] = torch.tensor([1.0, 0.0])
    w[5] = torch.tensor([0.0, 1.0])
    w[7] = 0.0
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-30), w)


@pytest.mark.parametrize("combine", ["mixture", "product"])
@pytest.mark.parametrize("name, fields", [("kl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}),
                                          ("kl", {"temperature": 2.0, "scale_by_temperature_squared": True})])
@pytest.mark.parametrize("chunk_size", [3, 256])
def test_ensemble_matches_the_float64_reference(combine, name, fields, chunk_size):
    student_hidden, student_head, heads, hidden, targets = setup(vocab_b=V - 2)  # member 1: a smaller vocabulary
    cfg = loss_cfg(name, chunk_size=chunk_size, **fields)
    weights = random_weights(1)
    got = ensemble_loss(student_hidden, student_head, targets, [Member(h) for h in heads], hidden, weights, combine,
                        cfg, kd_weight=0.7, ce_weight=0.3, normaliser=1.0)
    grads = torch.autograd.grad(got.loss, [student_hidden, student_head.weight])

    sh = student_hidden.detach().double().requires_grad_()
    hw = student_head.weight.detach().double().requires_grad_()
    want, kd, ce = reference(sh, LMHead(hw), heads, hidden, targets, weights, combine, cfg, 0.7, 0.3)
    want_grads = torch.autograd.grad(want, [sh, hw])
    torch.testing.assert_close(got.loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(got.kd_sum).double(), kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(got.ce_sum).double(), ce, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combine", ["mixture", "product"])
@pytest.mark.parametrize("member", [0, 1])
def test_all_weight_on_one_member_is_that_teacher_alone(combine, member):
    student_hidden, student_head, heads, hidden, targets = setup(seed=2)
    cfg = loss_cfg("jsd", beta=0.3, chunk_size=4)
    weights = torch.zeros(N, 2, dtype=torch.float64)
    weights[:, member] = 1.0
    got = ensemble_loss(student_hidden, student_head, targets, [Member(h) for h in heads], hidden, weights, combine,
                        cfg, kd_weight=0.5, ce_weight=0.5, normaliser=7.0)
    grads = torch.autograd.grad(got.loss, [student_hidden, student_head.weight])
    alone = fused_distillation_loss(student_hidden, student_head, hidden[member], heads[member], targets, cfg,
                                    kd_weight=0.5, ce_weight=0.5, normaliser=7.0)
    alone_grads = torch.autograd.grad(alone.loss, [student_hidden, student_head.weight])
    assert torch.equal(got.loss, alone.loss)
    for a, b in zip(grads, alone_grads):
        assert torch.equal(a, b)


def test_combined_log_probs_in_float64():
    g = torch.Generator().manual_seed(3)
    log_p = [F.log_softmax(torch.randn(5, 9, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    log_p[2][:, 4] = float("-inf")  # a member that gives a token no mass
    w = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), -1)
    w[0] = torch.tensor([0.5, 0.5, 0.0])  # the member without mass left out of row 0
    mixture = combine_log_probs(log_p, w, "mixture")
    probs = torch.stack(log_p).exp()
    torch.testing.assert_close(mixture, torch.log((w.t().unsqueeze(-1) * probs).sum(0)))
    product = combine_log_probs(log_p, w, "product")
    expect = (w.t().unsqueeze(-1) * torch.stack(log_p).nan_to_num(neginf=-1e300)).sum(0)
    torch.testing.assert_close(F.log_softmax(product, -1)[0], F.log_softmax(expect, -1)[0])
    assert torch.isinf(product[1:, 4]).all() and torch.isfinite(product[0]).all()
    with pytest.raises(ValueError, match="mixture or product"):
        combine_log_probs(log_p, w, "max")


def test_row_weights_follow_samples_and_coverage():
    sample = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64)
    covered = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    rows = row_weights(sample, torch.tensor([3, 1]), covered)
    expect = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(rows, expect)
