"""Teacher signals (kdlib.signals, kdlib.losses.estimators, kdlib.losses.sparse): each estimator
against a float64 reference of its formula written out here in probabilities, the chunked path
against the full-logit path, a top-k of the whole vocabulary against the hidden-state path (bit for
bit), and the sampled estimator's unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlib.config import LossConfig, LossImplementation, SignalConfig, SignalKind
from kdlib.losses import distillation_loss
from kdlib.losses.estimators import INTEGRANDS, sampled_estimate, signal_support, topk_estimate
from kdlib.losses.registry import LOSSES
from kdlib.losses.sparse import signal_distillation_loss
from kdlib.models.head import LMHead
from kdlib.signals import sample_seed, signal_from_hidden
from kdlib.teacher_output import TeacherOutput

def make_loss_config(name: str, **params) -> LossConfig:
    return LOSSES.entry(name).config_cls(name=name, **params)


# (loss, params) of every divergence with an integrand, end points included
CASES = [("kl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}), ("jsd", {"beta": 0.0}),
         ("jsd", {"beta": 1.0}), ("skl", {"lam": 0.1}), ("skl", {"lam": 0.0}), ("srkl", {"lam": 0.1}),
         ("srkl", {"lam": 0.0}), ("tvd", {})]


def _xlogy(x, y):
    """x log y with 0 log 0 = 0."""
    return torch.where(x == 0, torch.zeros_like(x), x * torch.log(torch.where(x == 0, torch.ones_like(y), y)))


def reference_divergence(loss: str, p: torch.Tensor, q: torch.Tensor, **params) -> torch.Tensor:
    """D(P || Q) per row from probabilities [N, n] (float64), straight from docs/losses.md."""
    def kl(a, b):
        return (_xlogy(a, a) - _xlogy(a, b)).sum(-1)

    if loss == "kl":
        return kl(p, q)
    if loss == "rkl":
        return kl(q, p)
    if loss == "jsd":
        beta = params["beta"]
        if beta == 0.0:
            return kl(p, q)
        if beta == 1.0:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if loss == "skl":
        return kl(p, params["lam"] * p + (1 - params["lam"]) * q)
    if loss == "srkl":
        return kl(q, params["lam"] * q + (1 - params["lam"]) * p)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise KeyError(loss)


def reference_integrand(loss: str, p: torch.Tensor, q: torch.Tensor, **params) -> torch.Tensor:
    """phi such that D(P || Q) = sum_v p_v phi(p_v, q_v), from probabilities (p > 0)."""
    r = q / p
    if loss == "kl" or (loss == "jsd" and params["beta"] == 0.0):
        return torch.log(p / q)
    if loss == "rkl" or (loss == "jsd" and params["beta"] == 1.0):
        return r * torch.log(q / p)
    if loss == "jsd":
        beta = params["beta"]
        m = beta * p + (1 - beta) * q
        return beta * torch.log(p / m) + (1 - beta) * r * torch.log(q / m)
    if loss == "skl":
        return torch.log(p / (params["lam"] * p + (1 - params["lam"]) * q))
    if loss == "srkl":
        return r * torch.log(q / (params["lam"] * q + (1 - params["lam"]) * p))
    if loss == "tvd":
        return 0.5 * (1 - r).abs()
    raise KeyError(loss)


def _random(rows=7, vocab=29, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * spread
    t = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * spread
    return s, F.log_softmax(t, -1), g


def _topk(lp: torch.Tensor, k: int, tail: bool):
    values, ids = lp.topk(k, -1)
    rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1) if tail and k < lp.shape[-1] else None
    return ids, values, rest


# ----------------------------------------------------------------------------------------------
# The estimators' formulas


@pytest.mark.parametrize("loss, params", CASES)
def test_integrand_under_the_teacher_is_the_divergence(loss, params):
    """sum_v p_v phi(log p_v, log q_v) is the registered divergence on the whole vocabulary: the
    integrand the sampled estimator averages is the right one."""
    s, lp, _ = _random()
    lq = F.log_softmax(s, -1)
    whole = (lp.exp() * INTEGRANDS[loss](lp, lq, **params)).sum(-1)
    torch.testing.assert_close(whole, LOSSES.get(loss)(s, lp, **params), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(whole, reference_divergence(loss, lp.exp(), lq.exp(), **params), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("loss, params", CASES)
def test_topk_estimate_is_the_divergence_of_the_buckets(loss, params, tail):
    """Top-k: D(P_b || Q_b) on the k tokens and the rest; without the tail the teacher's top k are
    renormalised and its rest bucket is empty."""
    s, lp, _ = _random()
    k = 5
    ids, values, rest = _topk(lp, k, tail)
    q = F.softmax(s, -1)
    q_top = q.gather(-1, ids)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    p_top = values.exp()
    if tail:
        p_b = torch.cat([p_top, rest.exp().unsqueeze(-1)], -1)
    else:
        p_b = torch.cat([p_top / p_top.sum(-1, keepdim=True), torch.zeros_like(p_top[:, :1])], -1)
    expected = reference_divergence(loss, p_b, q_b, **params)
    got = topk_estimate(loss, s, ids, values, rest, **params)
    if not tail and loss in ("rkl", "srkl", "tvd", "jsd", "skl") and torch.isinf(expected).any():
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        return
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if tail:  # the tail form is exact on the buckets: with the buckets as the vocabulary, D itself
        assert (got <= LOSSES.get(loss)(s, lp, **params) + 1e-12).all()  # data processing inequality


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.5])
@pytest.mark.parametrize("loss, params", CASES)
def test_sampled_estimate_is_the_importance_weighted_integrand(loss, params, proposal_temperature):
    """Sampled: (1/k) sum_j (p / r)(x_j) phi(p(x_j), q(x_j)) over the k draws x_j from r."""
    s, lp, g = _random()
    k = 6
    r = F.log_softmax(lp / proposal_temperature, -1)
    ids = torch.multinomial(r.exp(), k, replacement=True, generator=g)
    proposal = None if proposal_temperature == 1.0 else r.gather(-1, ids)
    p_x = lp.exp().gather(-1, ids)
    q_x = F.softmax(s, -1).gather(-1, ids)
    weights = p_x / r.exp().gather(-1, ids) / k
    expected = (weights * reference_integrand(loss, p_x, q_x, **params)).sum(-1)
    got = sampled_estimate(loss, s, ids, lp.gather(-1, ids), proposal, **params)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# The chunked path against the full-logit path (float64: values and gradients)


def _student(rows, hidden, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)).requires_grad_(True)
    b = (0.1 * torch.randn(vocab, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[2] = -100
    return h, LMHead(w, b), targets


def _signal(kind: str, vocab: int, rows: int, k: int, *, tail=True, proposal=False, seed=1) -> TeacherOutput:
    g = torch.Generator().manual_seed(seed)
    lp = F.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2, -1)
    if kind == "topk":
        ids, values, rest = _topk(lp, k, tail)
        return TeacherOutput(topk_ids=ids.to(torch.uint16), topk_logprobs=values, topk_tail=rest)
    r = F.log_softmax(lp / (2.0 if proposal else 1.0), -1)
    ids = torch.multinomial(r.exp(), k, replacement=True, generator=g)
    return TeacherOutput(sampled_ids=ids.to(torch.int32), sampled_logprobs=lp.gather(-1, ids),
                         sampled_proposal=r.gather(-1, ids) if proposal else None)


def _run(h, head, teacher, targets, loss, params, implementation, chunk_size=4):
    cfg = make_loss_config(loss, **params)
    cfg.implementation, cfg.chunk_size = implementation, chunk_size
    for x in (h, head.weight, head.bias):
        x.grad = None
    terms = signal_distillation_loss(h, head, teacher, targets, cfg, kd_weight=0.7, ce_weight=0.3, normaliser=3.0)
    terms.loss.backward()
    return terms, [x.grad.clone() for x in (h, head.weight, head.bias)]


SIGNALS = [("topk", dict(k=5)), ("topk", dict(k=5, tail=False)), ("topk", dict(k=23)), ("sampled", dict(k=6)),
           ("sampled", dict(k=6, proposal=True))]


@pytest.mark.parametrize("kind, options", SIGNALS)
@pytest.mark.parametrize("loss, params", CASES + [("top1_ce", {"weight_by_teacher": True}), ("hrl", {"topk": 3})])
def test_chunked_estimator_is_the_full_logit_estimator(kind, options, loss, params):
    """Fused (chunks of 4 rows, closed-form backward through the head) against the naive path's
    autograd on full logits: values and gradients of hidden states, head weight and bias."""
    if signal_support(loss, kind, params, options["k"]):
        pytest.skip("not defined for this signal (tested as a config error)")
    rows, vocab = 11, 23
    h, head, targets = _student(rows, 8, vocab, seed=3)
    teacher = _signal(kind, vocab, rows, **options)
    naive, naive_grads = _run(h, head, teacher, targets, loss, params, LossImplementation.naive)
    if not torch.isfinite(naive.loss):
        pytest.skip("infinite on a truncated teacher (refused at composition)")
    fused, fused_grads = _run(h, head, teacher, targets, loss, params, LossImplementation.fused)
    for a, b in [(fused.loss, naive.loss), (fused.kd_sum, naive.kd_sum), (fused.ce_sum, naive.ce_sum)] + list(
            zip(fused_grads, naive_grads)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert naive.kd_sum != 0 and any(g.abs().sum() > 0 for g in fused_grads)


def test_unsupported_pairs_say_why():
    assert "whole distribution" in signal_support("akl", "topk", {}, 8)
    assert "ranks the teacher's top 5" in signal_support("hrl", "topk", {"topk": 5}, 4)
    assert signal_support("hrl", "topk", {"topk": 5}, 5) is None
    assert "most probable tokens" in signal_support("top1_ce", "sampled", {}, 8)
    assert "register its integrand" in signal_support("my_loss", "sampled", {}, 8)
    assert all(signal_support(name, "hidden", {}, 1) is None for name in LOSSES.names())
    h, head, targets = _student(4, 8, 23, seed=0)
    with pytest.raises(ValueError, match="loss=akl cannot use teacher.signal=topk"):
        signal_distillation_loss(h, head, _signal("topk", 23, 4, 3), targets, make_loss_config("akl"),
                                 kd_weight=1.0, ce_weight=0.0, normaliser=1.0)


# ----------------------------------------------------------------------------------------------
# The hf teacher's signals from hidden states: a whole-vocabulary top-k is the hidden-state path


@pytest.fixture(scope="module")
def tiny_pair(tiny_llama):
    """Teacher and student hidden states at 40 positions of random (non-zero) text, and both heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdlib.models.head import lm_head_of

    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    torch.manual_seed(5)
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama)).float()
    ids = torch.randint(1, teacher.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t_hidden = teacher.model(ids).last_hidden_state.reshape(40, -1)
        s_hidden = student.model(ids).last_hidden_state.reshape(40, -1)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1).reshape(-1)
    return t_hidden, lm_head_of(teacher).detached(), s_hidden, lm_head_of(student), targets


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("loss", ["kl", "rkl", "jsd", "skl", "srkl", "tvd", "top1_ce", "hrl"])
def test_topk_of_the_whole_vocabulary_is_the_hidden_state_path_bit_for_bit(tiny_pair, loss, wire):
    t_hidden, t_head, s_hidden, s_head, targets = tiny_pair
    cfg = make_loss_config(loss)
    cfg.chunk_size = 16
    vocab = t_head.vocab_size
    results = []
    for signal in ("hidden", "topk"):
        h = s_hidden.clone().requires_grad_(True)
        s_head.weight.grad = None
        sent = TeacherOutput(hidden=t_hidden.to(wire), row_offsets=torch.tensor([0, 20, 40]))
        weights = dict(kd_weight=0.6, ce_weight=0.4, normaliser=40.0)
        if signal == "hidden":
            terms = distillation_loss(h, s_head, sent.hidden, t_head, targets, cfg, **weights)
        else:
            sent = signal_from_hidden(sent, t_head, SignalConfig(kind=SignalKind.topk, k=vocab), wire_dtype=wire,
                                      chunk_size=cfg.chunk_size)
            assert sent.topk_ids.shape == (40, vocab) and sent.topk_tail is not None
            terms = signal_distillation_loss(h, s_head, sent, targets, cfg, **weights)
        terms.loss.backward()
        results.append((terms.loss.detach(), terms.kd_sum, terms.ce_sum, h.grad, s_head.weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert results[0][1] > 0 and results[0][3].abs().sum() > 0


def test_signals_from_hidden_states_are_the_teachers_distribution(tiny_pair):
    t_hidden, t_head, *_ = tiny_pair
    full = F.log_softmax(t_head.logits(t_hidden.to(torch.bfloat16).float()).double(), -1)
    top = signal_from_hidden(TeacherOutput(hidden=t_hidden), t_head, SignalConfig(kind=SignalKind.topk, k=8),
                             wire_dtype=torch.bfloat16, chunk_size=16)
    values, ids = full.topk(8, -1)
    assert torch.equal(top.topk_ids.long(), ids) and top.topk_ids.dtype == torch.uint16
    torch.testing.assert_close(top.topk_logprobs.double(), values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(top.topk_tail.double(), torch.logsumexp(full.scatter(-1, ids, float("-inf")), -1),
                               rtol=1e-5, atol=1e-5)
    cfg = SignalConfig(kind=SignalKind.sampled, k=5, proposal_temperature=2.0)
    drawn = signal_from_hidden(TeacherOutput(hidden=t_hidden), t_head, cfg, wire_dtype=torch.bfloat16, chunk_size=16,
                               generator=torch.Generator().manual_seed(0))
    ids = drawn.sampled_ids.long()
    torch.testing.assert_close(drawn.sampled_logprobs.double(), full.gather(-1, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(drawn.sampled_proposal.double(), F.log_softmax(full / 2, -1).gather(-1, ids),
                               rtol=1e-4, atol=1e-5)


def test_a_samples_draws_depend_on_its_key_not_on_its_micro_batch(tiny_pair):
    """Draws are seeded per sample (signal seed and content key): the same sample draws the same
    tokens alone or next to another, so a cache and a live teacher agree."""
    t_hidden, t_head, *_ = tiny_pair
    cfg = SignalConfig(kind=SignalKind.sampled, k=4)
    seeds = [sample_seed(0, "a" * 32), sample_seed(0, "b" * 32)]
    both = signal_from_hidden(TeacherOutput(hidden=t_hidden, row_offsets=torch.tensor([0, 20, 40])), t_head, cfg,
                              wire_dtype=torch.float32, chunk_size=7, seeds=seeds)
    alone = signal_from_hidden(TeacherOutput(hidden=t_hidden[20:], row_offsets=torch.tensor([0, 20])), t_head, cfg,
                               wire_dtype=torch.float32, chunk_size=16, seeds=seeds[1:])
    assert torch.equal(both.sampled_ids[20:], alone.sampled_ids)
    assert not torch.equal(both.sampled_ids[:20], both.sampled_ids[20:])
    assert sample_seed(1, "a" * 32) != seeds[0]


# ----------------------------------------------------------------------------------------------
# Unbiasedness of the sampled estimator


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss, params", [("kl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("tvd", {})])
def test_sampled_estimator_is_unbiased(loss, params, proposal_temperature):
    """M = 4000 independent estimates (k = 4 draws each, made by the teacher's own sampling code)
    of one position's divergence: their mean value, and their mean gradient with respect to each
    student logit, lie within 5 standard errors (std / sqrt(M)) of the exact ones; the top-k
    estimate with as many tokens is off by many times that."""
    vocab, m, k = 24, 4000, 4
    g = torch.Generator().manual_seed(11)
    teacher_logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5
    s = (torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    exact = LOSSES.get(loss)(s[None], teacher_logits[None], **params)[0]
    exact_grad = torch.autograd.grad(exact, s)[0]

    head = LMHead(torch.eye(vocab, dtype=torch.float64))  # logits = the "hidden state" itself
    cfg = SignalConfig(kind=SignalKind.sampled, k=k, proposal_temperature=proposal_temperature)
    drawn = signal_from_hidden(TeacherOutput(hidden=teacher_logits.expand(m, vocab).clone()), head, cfg,
                               wire_dtype=torch.float64, chunk_size=512, generator=g)
    logits = s.detach().expand(m, vocab).clone().requires_grad_(True)
    values = sampled_estimate(loss, logits, drawn.sampled_ids, drawn.sampled_logprobs, drawn.sampled_proposal, **params)
    grads = torch.autograd.grad(values.sum(), logits)[0]  # row i: the gradient of estimate i

    se = values.std() / math.sqrt(m)
    assert abs(values.mean() - exact) <= 5 * se and se < 0.05 * exact
    grad_se = grads.std(0) / math.sqrt(m)
    assert ((grads.mean(0) - exact_grad).abs() <= 5 * grad_se + 1e-12).all()

    values_t, ids = F.log_softmax(teacher_logits, -1).topk(k)
    biased = topk_estimate(loss, s[None].detach(), ids[None], values_t[None], None, **params)[0]
    assert abs(biased - exact) > 10 * se


def test_sampled_signal_refuses_a_temperature():
    h, head, targets = _student(4, 8, 23, seed=0)
    with pytest.raises(ValueError, match="carries log-probabilities at temperature 1; loss.temperature=2 needs"):
        cfg = LossConfig(name="kl", temperature=2.0)
        signal_distillation_loss(h, head, _signal("sampled", 23, 4, 3), targets, cfg, kd_weight=1.0, ce_weight=0.0,
                                 normaliser=1.0)


def test_expected_calibration_error_matches_a_float64_reference():
    """ECE over 15 equal-width bins of the student's top-1 probability (Guo et al. 2017), summed
    over chunks of rows, against the definition computed token by token."""
    from kdlib.evaluation import heldout_sums

    g = torch.Generator().manual_seed(4)
    hidden, head = torch.randn(50, 6, generator=g), LMHead(torch.randn(13, 6, generator=g))
    targets = torch.randint(0, 13, (50,), generator=g)
    probs = F.softmax(head.logits(hidden).double(), -1)
    confidence, top = probs.max(-1)
    bins = [[] for _ in range(15)]
    for c, correct in zip(confidence.tolist(), (top == targets).tolist()):
        bins[min(int(c * 15), 14)].append((c, correct))
    expected = sum(abs(sum(ok for _, ok in b) - sum(c for c, _ in b)) for b in bins) / 50
    got = heldout_sums(hidden, head, None, None, targets, chunk_size=7).means()["ece"]
    assert got == pytest.approx(expected, rel=1e-6) and got > 0
