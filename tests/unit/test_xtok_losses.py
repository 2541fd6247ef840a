"""The cross-tokenizer methods against float64 references of their formulas.

The references below materialise every logit, loop over the groups of each sample one at a time
and follow the formulas of docs/cross_tokenizer.md (they share no code with kdlib.xtok but the
alignment itself, which test_xtok_alignment checks); gradients come from autograd through them.
The chunked methods must give the same values and gradients for every chunk size, reduce to their
same-tokenizer counterparts with identical tokenizers, and pass gradcheck.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kdlib.config.schema import LossImplementation
from kdlib.losses import LOSSES, distillation_loss
from kdlib.models.head import LMHead
from kdlib.xtok import method as method_module
from kdlib.xtok.alignment import align
from kdlib.xtok.distributions import merged_log_probs
from kdlib.xtok.distributions import sorted_l1 as xtok_sorted_l1
from kdlib.xtok.dskd import DSKDConfig, DSKDLoss, DSKDProjectors, T2STarget
from kdlib.xtok.gold import GOLDConfig, GOLDLoss
from kdlib.xtok.groups import AlignmentBatch
from kdlib.xtok.marginal import MarginalConfig, MarginalLoss
from kdlib.xtok.offsets import ResponseTokens
from kdlib.xtok.overlap import OverlapLoss
from kdlib.xtok.uld import ULDConfig, ULDLoss
from kdlib.xtok.vocab import VocabMatch

F64 = torch.float64

# Byte ends of the text tokens of each sample (student, teacher) and whether each side keeps its
# end-of-turn token: 1:1, 1:many, many:1 and many:many groups, and a sample whose student was cut.
LAYOUTS = [
    ((1, 3, 4, 6, 8, 9), (1, 2, 3, 4, 6, 7, 9), True, True),
    ((2, 4, 5), (1, 2, 3, 5, 6, 8, 10), False, True),
    ((3, 4, 7), (1, 3, 5, 7), True, True),
]


def cfg(name="kl", **fields):
    return LOSSES.entry(name).config_cls(**fields)


@dataclasses.dataclass
class Case:
    student_hidden: torch.Tensor
    student_head: LMHead
    teacher_hidden: torch.Tensor  # [all teacher loss rows, Ht]
    teacher_head: LMHead
    samples: list
    batch: AlignmentBatch
    match: VocabMatch
    targets: torch.Tensor

    def params(self, extra=()):
        return [self.student_hidden, self.student_head.weight, self.student_head.bias, *extra]


def synthetic_match(student_ids, teacher_ids, vs, vt, generator):
    """A VocabMatch whose prefix map sends matched teacher tokens to their match, two unmatched
    ones nowhere (-1) and the rest to random student tokens among the first half (so some student
    tokens receive no teacher mass)."""
    prefix = torch.randint(0, vs // 2, (vt,), generator=generator)
    unmatched = [t for t in range(vt) if t not in set(teacher_ids.tolist())]
    prefix[unmatched[:2]] = -1
    prefix[teacher_ids] = student_ids
    return VocabMatch(student_ids, teacher_ids, vs, vt, prefix)


def make_case(*, vs=40, vt=48, hs=12, ht=10, seed=0, dtype=F64, identical=False, layouts=LAYOUTS):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    if identical:
        vt, ht = vs, hs
        match = VocabMatch(torch.arange(vs), torch.arange(vs), vs, vs, torch.arange(vs))
    else:
        matched = min(30, vs, vt)
        match = synthetic_match(torch.arange(matched), torch.randperm(vt, generator=g)[:matched], vs, vt, g)
    samples = []
    for s_ends, t_ends, s_eot, t_eot in (layouts if not identical else [(e, e, True, True) for e, _, _, _ in layouts]):
        s_ids = torch.randint(0, vs, (len(s_ends) + s_eot,), generator=g).tolist()
        t_ids = torch.randint(0, vt, (len(t_ends) + t_eot,), generator=g).tolist()
        if identical:
            t_ids = list(s_ids)
        text = "x" * max(s_ends[-1], t_ends[-1])
        samples.append(align(ResponseTokens(tuple(s_ids), s_ends, text, s_eot),
                             ResponseTokens(tuple(t_ids), t_ends, text, t_eot), row="synthetic"))
    batch = AlignmentBatch.from_samples(samples)
    student = LMHead(weight=rand(vs, hs, scale=0.7).requires_grad_(True), bias=rand(vs, scale=0.5).requires_grad_(True))
    teacher = LMHead(weight=rand(vt, ht, scale=0.7), bias=rand(vt, scale=0.5))
    if identical:
        teacher = LMHead(weight=rand(vs, hs, scale=0.7), bias=rand(vs, scale=0.5))
    return Case(
        student_hidden=rand(batch.n_student_rows, hs).requires_grad_(True),
        student_head=student,
        teacher_hidden=rand(batch.n_teacher_rows, ht),
        teacher_head=teacher,
        samples=samples,
        batch=batch,
        match=match,
        targets=batch.student_ids.clone(),
    )


def run(method, case: Case, *, extra=()):
    teacher_hidden = case.teacher_hidden[method.teacher_rows(case.batch)]
    terms = method(case.student_hidden, case.student_head, teacher_hidden, case.batch, case.targets, normaliser=3.0)
    grads = torch.autograd.grad(terms.loss, case.params(extra))
    return terms, grads


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# float64 references: full logits, one group at a time


def kl(p, q):
    keep = p > 0
    return (p[keep] * (p[keep].log() - q[keep].log())).sum()


def jsd(p, q, beta):
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def divergence(name, p, q, params):
    """D(P || Q) of the built-ins the tests use, on probability vectors."""
    if name == "kl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        return jsd(p, q, params["beta"])
    raise AssertionError(name)


def ref_groups(case: Case):
    """(student rows, teacher rows) of every group, with batch rows."""
    out = []
    for b, sample in enumerate(case.samples):
        s0, t0 = int(case.batch.student_offsets[b]), int(case.batch.teacher_offsets[b])
        for s_range, t_range in sample.groups():
            out.append(([s0 + i for i in s_range], [t0 + j for j in t_range]))
    return out


def ref_logits(case: Case):
    zs = case.student_hidden @ case.student_head.weight.t() + case.student_head.bias
    zt = case.teacher_hidden @ case.teacher_head.weight.t() + case.teacher_head.bias
    return zs, zt


def ref_ce(case, zs):
    return F.cross_entropy(zs, case.targets, reduction="sum")


def ref_overlap(case, name="kl", params=None, temperature=1.0, t2=False):
    params = params or {}
    zs, zt = ref_logits(case)
    kd = 0.0
    for s_rows, t_rows in ref_groups(case):
        if len(s_rows) == len(t_rows) == 1:
            q = torch.softmax(zs[s_rows[0], case.match.student_ids] / temperature, -1)
            p = torch.softmax(zt[t_rows[0], case.match.teacher_ids] / temperature, -1)
            kd = kd + divergence(name, p, q, params) * (temperature**2 if t2 else 1.0)
    return kd, ref_ce(case, zs)


def sorted_l1(a, b):
    a, b = a.sort(descending=True).values, b.sort(descending=True).values
    n = max(a.numel(), b.numel())
    return (F.pad(a, (0, n - a.numel())) - F.pad(b, (0, n - b.numel()))).abs().sum()


def chain(z, rows, ids, temperature):
    """p(first row) * prod of the probabilities of the later rows' actual tokens."""
    dist = torch.softmax(z[rows[0]] / temperature, -1)
    for r in rows[1:]:
        dist = dist * torch.softmax(z[r] / temperature, -1)[ids[r]]
    return dist


def ref_uld(case, ts=1.0, tt=1.0, merge=False):
    zs, zt = ref_logits(case)
    kd = 0.0
    for s_rows, t_rows in ref_groups(case):
        if not merge:
            s_rows, t_rows = s_rows[:1], t_rows[:1]
        kd = kd + sorted_l1(chain(zs, s_rows, case.batch.student_ids, ts), chain(zt, t_rows, case.batch.teacher_ids, tt))
    return kd, ref_ce(case, zs)


def ref_gold(case, name="kl", params=None, temperature=1.0, matched_weight=None, floor=1e-12):
    params = params or {}
    zs, zt = ref_logits(case)
    w = case.match.size / case.match.teacher_vocab_size if matched_weight is None else matched_weight
    s_ids, t_ids = case.match.student_ids.tolist(), case.match.teacher_ids.tolist()
    s_rest_ids = [v for v in range(zs.shape[1]) if v not in s_ids]
    t_rest_ids = [v for v in range(zt.shape[1]) if v not in t_ids]
    kd = 0.0
    for s_rows, t_rows in ref_groups(case):
        ms = chain(zs, s_rows, case.batch.student_ids, temperature)
        mt = chain(zt, t_rows, case.batch.teacher_ids, temperature)
        q = torch.cat([ms[s_ids], (1 - ms[s_ids].sum()).clamp_min(floor).reshape(1)])
        p = torch.cat([mt[t_ids], (1 - mt[t_ids].sum()).clamp_min(floor).reshape(1)])
        kd = kd + w * divergence(name, p / p.sum(), q / q.sum(), params)
        kd = kd + (1 - w) * sorted_l1(ms[s_rest_ids], mt[t_rest_ids])
    return kd, ref_ce(case, zs)


def ref_marginal(case, name="kl", params=None, temperature=1.0, t2=False, floor=1e-12):
    """At each group's first rows: the teacher's probabilities (over the tokens with a student
    start) summed onto the student tokens they start with, floored, renormalised."""
    params = params or {}
    zs, zt = ref_logits(case)
    prefix = case.match.teacher_prefix
    carried = [t for t in range(zt.shape[1]) if int(prefix[t]) >= 0]
    kd = 0.0
    for s_rows, t_rows in ref_groups(case):
        p_teacher = torch.softmax(zt[t_rows[0], carried] / temperature, -1)
        p = torch.zeros(zs.shape[1], dtype=zs.dtype)
        for k, t in enumerate(carried):
            p[int(prefix[t])] += p_teacher[k]
        p = p.clamp_min(floor)
        q = torch.softmax(zs[s_rows[0]] / temperature, -1)
        kd = kd + divergence(name, p / p.sum(), q, params) * (temperature**2 if t2 else 1.0)
    return kd, ref_ce(case, zs)


def ref_dskd(case, projectors, name="kl", params=None, t2s_target="data"):
    params = params or {}
    zs, zt = ref_logits(case)
    ws, bs = case.student_head.weight, case.student_head.bias
    kd = 0.0
    to_student = {t: s for s, t in zip(case.match.student_ids.tolist(), case.match.teacher_ids.tolist())}
    for s_rows, t_rows in ref_groups(case):
        if len(s_rows) != 1 or len(t_rows) != 1:
            continue
        s, t = s_rows[0], t_rows[0]
        t2s = (projectors.t2s.weight @ case.teacher_hidden[t]) @ ws.detach().t() + bs.detach()
        kd = kd + divergence(name, torch.softmax(t2s.detach(), -1), torch.softmax(zs[s], -1), params)
        target = int(case.targets[s]) if t2s_target == "data" else to_student.get(int(zt[t].argmax()))
        if target is not None:
            kd = kd - torch.log_softmax(t2s, -1)[target]
        s2t = (projectors.s2t.weight @ case.student_hidden[s]) @ case.teacher_head.weight.t() + case.teacher_head.bias
        kd = kd + divergence(name, torch.softmax(zt[t], -1), torch.softmax(s2t, -1), params)
    return kd, ref_ce(case, zs)


def projectors_for(case, seed=5):
    """Trainable float64 projectors, perturbed away from their pseudo-inverse initialisation."""
    projectors = DSKDProjectors.from_heads(case.student_head, case.teacher_head, case.match).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in projectors.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=F64) * 0.1)
    return projectors


METHODS = {
    "overlap-kl": (lambda c: OverlapLoss(c.teacher_head, c.match, cfg("kl"), kd_weight=0.7, ce_weight=0.3, chunk_size=CHUNK),
                   lambda c: ref_overlap(c)),
    "overlap-jsd-T2": (lambda c: OverlapLoss(c.teacher_head, c.match,
                                             cfg("jsd", beta=0.3, temperature=2.0, scale_by_temperature_squared=True),
                                             kd_weight=0.7, ce_weight=0.3, chunk_size=CHUNK),
                       lambda c: ref_overlap(c, "jsd", {"beta": 0.3}, 2.0, True)),
    "uld": (lambda c: ULDLoss(c.teacher_head, ULDConfig(student_temperature=1.5, teacher_temperature=0.8),
                              kd_weight=0.7, ce_weight=0.3, chunk_size=CHUNK),
            lambda c: ref_uld(c, 1.5, 0.8)),
    "uld-merged": (lambda c: ULDLoss(c.teacher_head, ULDConfig(merge_groups=True), kd_weight=0.7, ce_weight=0.3,
                                     chunk_size=CHUNK),
                   lambda c: ref_uld(c, merge=True)),
    "gold-kl": (lambda c: GOLDLoss(c.teacher_head, c.match, cfg("kl"), kd_weight=0.7, ce_weight=0.3, chunk_size=CHUNK),
                lambda c: ref_gold(c)),
    "gold-rkl-weighted": (lambda c: GOLDLoss(c.teacher_head, c.match, cfg("rkl", temperature=1.3),
                                             GOLDConfig(matched_weight=0.6), kd_weight=0.7, ce_weight=0.3,
                                             chunk_size=CHUNK),
                          lambda c: ref_gold(c, "rkl", temperature=1.3, matched_weight=0.6)),
    "marginal-kl": (lambda c: MarginalLoss(c.teacher_head, c.match, cfg("kl"), kd_weight=0.7, ce_weight=0.3,
                                           chunk_size=CHUNK),
                    lambda c: ref_marginal(c)),
    "marginal-rkl-T2": (lambda c: MarginalLoss(c.teacher_head, c.match,
                                               cfg("rkl", temperature=2.0, scale_by_temperature_squared=True),
                                               MarginalConfig(empty_floor=1e-6), kd_weight=0.7, ce_weight=0.3,
                                               chunk_size=CHUNK),
                        lambda c: ref_marginal(c, "rkl", temperature=2.0, t2=True, floor=1e-6)),
}
CHUNK = 3


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("name", list(METHODS))
def test_chunked_equals_float64_reference(name, chunk, monkeypatch):
    monkeypatch.setitem(globals(), "CHUNK", chunk)
    case = make_case(seed=1)
    build, reference = METHODS[name]
    terms, grads = run(build(case), case)
    kd, ce = reference(case)
    assert rel_err(terms.kd_sum, kd) < 1e-12 and rel_err(terms.ce_sum, ce) < 1e-12
    assert float(kd.detach()) > 0
    expected = (0.7 * kd + 0.3 * ce) / 3.0
    assert rel_err(terms.loss, expected) < 1e-12
    for a, b in zip(grads, torch.autograd.grad(expected, case.params())):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("target", ["data", "teacher_argmax"])
@pytest.mark.parametrize("chunk", [1, 1000])
def test_dskd_equals_float64_reference(target, chunk):
    case = make_case(seed=2)
    projectors = projectors_for(case)
    loss = DSKDLoss(case.teacher_head, projectors, cfg("kl"), DSKDConfig(t2s_target=T2STarget(target)),
                    match=case.match, kd_weight=0.7, ce_weight=0.3, chunk_size=chunk)
    extra = list(projectors.parameters())
    terms, grads = run(loss, case, extra=extra)
    kd, ce = ref_dskd(case, projectors, t2s_target=target)
    expected = (0.7 * kd + 0.3 * ce) / 3.0
    assert rel_err(terms.kd_sum, kd) < 1e-12 and rel_err(terms.loss, expected) < 1e-12
    reference_grads = torch.autograd.grad(expected, case.params(extra))
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(grads, reference_grads))
    assert float(grads[-1].abs().sum()) > 0 and float(grads[-2].abs().sum()) > 0  # both projectors learn


@pytest.mark.parametrize("name", list(METHODS))
def test_float32_is_close_to_float64(name):
    build, _ = METHODS[name]
    exact = make_case(seed=3)
    low = make_case(seed=3, dtype=torch.float32)
    (t64, g64), (t32, g32) = run(build(exact), exact), run(build(low), low)
    assert t32.loss.dtype == torch.float32
    assert rel_err(t32.loss, t64.loss) < 1e-5
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(g32, g64))


def test_logits_are_computed_chunk_by_chunk(monkeypatch):
    """No [tokens, vocab] tensor for the whole batch: every head evaluation sees at most one chunk."""
    seen = []
    original = method_module.head_logits

    def spy(head, hidden, dtype):
        seen.append(hidden.shape[0])
        return original(head, hidden, dtype)

    monkeypatch.setattr(method_module, "head_logits", spy)
    case = make_case(seed=4, layouts=LAYOUTS * 4)
    for build, _ in METHODS.values():
        seen.clear()
        run(build(case), case)  # CHUNK = 3 rows; the largest group of LAYOUTS has 3 rows
        assert seen and max(seen) <= 3 < case.batch.n_student_rows


# ---------------------------------------------------------------------------------------------
# identical tokenizers: every method reduces to its same-tokenizer counterpart


def vanilla(case, loss_cfg, implementation):
    loss_cfg = dataclasses.replace(loss_cfg, implementation=LossImplementation(implementation), chunk_size=5)
    return distillation_loss(
        case.student_hidden, case.student_head, case.teacher_hidden, case.teacher_head, case.targets, loss_cfg,
        kd_weight=0.7, ce_weight=0.3, normaliser=3.0,
    )


SAME_TOKENIZER_LOSSES = [cfg("kl"), cfg("rkl", temperature=2.0), cfg("jsd", beta=0.2, scale_by_temperature_squared=True,
                                                                     temperature=1.5),
                         cfg("skl", lam=0.2), cfg("tvd")]


@pytest.mark.parametrize("loss_cfg", SAME_TOKENIZER_LOSSES, ids=lambda c: c.name)
@pytest.mark.parametrize("kind", ["overlap", "gold", "marginal"])
def test_identical_tokenizers_reduce_to_vanilla_kd(kind, loss_cfg):
    case = make_case(seed=5, identical=True)
    assert bool(case.batch.one_to_one.all())
    cls = {"overlap": OverlapLoss, "gold": GOLDLoss, "marginal": MarginalLoss}[kind]
    terms, grads = run(cls(case.teacher_head, case.match, loss_cfg, kd_weight=0.7, ce_weight=0.3, chunk_size=4), case)
    zs, zt = ref_logits(case)
    t = loss_cfg.temperature
    params = {k: getattr(loss_cfg, k) for k in loss_cfg.__dataclass_fields__ if k not in cfg("kl").__dataclass_fields__}
    kd = LOSSES.get(loss_cfg.name)(zs / t, zt / t, **params).sum() * (t**2 if loss_cfg.scale_by_temperature_squared else 1)
    assert rel_err(terms.kd_sum, kd) < 1e-13
    expected = (0.7 * kd + 0.3 * ref_ce(case, zs)) / 3.0
    for a, b in zip(grads, torch.autograd.grad(expected, case.params())):
        assert rel_err(a, b) < 1e-11
    for implementation in ("naive", "fused"):  # kdlib's own vanilla KD, float32 inside
        assert rel_err(terms.loss, vanilla(case, loss_cfg, implementation).loss) < 1e-6


def test_identical_tokenizers_uld_is_the_positionwise_paper_formula():
    case = make_case(seed=6, identical=True)
    zs, zt = ref_logits(case)
    paper = sum(sorted_l1(torch.softmax(zs[i], -1), torch.softmax(zt[i], -1)) for i in range(zs.shape[0]))
    for merge in (False, True):
        terms, _ = run(ULDLoss(case.teacher_head, ULDConfig(merge_groups=merge), chunk_size=4), case)
        assert rel_err(terms.kd_sum, paper) < 1e-13


def test_identical_heads_dskd_projections_equal_the_original_logits():
    case = make_case(seed=7, identical=True, dtype=torch.float32)
    same = LMHead(weight=case.teacher_head.weight.clone(), bias=case.teacher_head.bias.clone())
    projectors = DSKDProjectors.from_heads(same, case.teacher_head, case.match)
    h_t, h_s = case.teacher_hidden, case.student_hidden.detach()
    with torch.no_grad():
        assert rel_err(same.logits(projectors.t2s(h_t)), case.teacher_head.logits(h_t)) < 1e-5
        assert rel_err(case.teacher_head.logits(projectors.s2t(h_s)), same.logits(h_s)) < 1e-5
    # so at initialisation DSKD = 2 * KL(teacher || student) + CE(teacher logits, data) per pair
    loss = DSKDLoss(case.teacher_head, projectors, cfg("kl"), kd_weight=1.0, ce_weight=0.0)
    student = dataclasses.replace(same, weight=same.weight.clone().requires_grad_(True))
    terms = loss(h_s, student, h_t, case.batch, case.targets)
    zs, zt = same.logits(h_s), case.teacher_head.logits(h_t)
    expected = 2 * LOSSES.get("kl")(zs, zt).sum() + F.cross_entropy(zt, case.targets, reduction="sum")
    assert rel_err(terms.kd_sum, expected) < 1e-5


def test_dskd_projector_state_round_trips():
    case = make_case(seed=8)
    projectors = projectors_for(case)
    restored = DSKDProjectors(projectors.t2s.out_features, projectors.t2s.in_features).double()
    restored.load_state_dict(projectors.state_dict())
    assert sorted(projectors.state_dict()) == ["s2t.weight", "t2s.weight"]
    for name, value in projectors.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)


# ---------------------------------------------------------------------------------------------
# ULD invariance, chain rule, gradcheck, input checks


@pytest.mark.parametrize("merge", [False, True])
def test_uld_is_invariant_to_permuting_a_vocabulary(merge):
    case = make_case(seed=9)
    before, grads_before = run(ULDLoss(case.teacher_head, ULDConfig(merge_groups=merge), chunk_size=2), case)
    perm = torch.randperm(case.teacher_head.vocab_size, generator=torch.Generator().manual_seed(0))
    inverse = torch.argsort(perm)
    permuted = dataclasses.replace(case, teacher_head=LMHead(case.teacher_head.weight[perm], case.teacher_head.bias[perm]))
    permuted.batch = dataclasses.replace(case.batch, teacher_ids=inverse[case.batch.teacher_ids])
    after, grads_after = run(ULDLoss(permuted.teacher_head, ULDConfig(merge_groups=merge), chunk_size=2), permuted)
    assert not torch.equal(permuted.teacher_head.weight, case.teacher_head.weight)
    assert rel_err(after.kd_sum, before.kd_sum) < 1e-13
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads_after, grads_before))


def test_chain_rule_merge_equals_the_joint_probability_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 1.5, 0.3, -0.2], [1.0, 1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 3.0]], dtype=F64)
    ids = torch.tensor([3, 1, 2, 0])  # the token each row predicts: the group spells 3, 1, 2
    merged, log_c = merged_log_probs(torch.log_softmax(logits, -1), ids, torch.tensor([0, 3]), torch.tensor([3, 1]))
    p = torch.softmax(logits, -1)
    joint = p[0, 3] * p[1, 1] * p[2, 2]  # P(3) P(1 | 3) P(2 | 3, 1)
    assert torch.allclose(merged[0].exp()[3], joint, rtol=1e-14, atol=0)
    assert torch.allclose(merged[0].exp(), p[0] * p[1, 1] * p[2, 2], rtol=1e-14, atol=0)
    assert torch.allclose(log_c, torch.stack([(p[1, 1] * p[2, 2]).log(), torch.zeros((), dtype=F64)]))
    assert torch.equal(merged[1], torch.log_softmax(logits[3], -1))  # a one-token group is its row


@pytest.mark.parametrize("widths", [(7, 12), (12, 7), (9, 9)])
def test_sorted_l1_is_the_sort_and_pad_formula(widths):
    g = torch.Generator().manual_seed(12)
    p = torch.softmax(torch.randn(5, widths[0], generator=g, dtype=F64), -1)
    q = torch.softmax(torch.randn(5, widths[1], generator=g, dtype=F64), -1)
    q[:, :4] = q[:, 4:5]  # ties, some of them at the cut
    expected = torch.stack([sorted_l1(p[i], q[i]) for i in range(5)])
    assert torch.allclose(xtok_sorted_l1(p, q), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["overlap-jsd-T2", "uld", "uld-merged", "gold-kl", "gold-rkl-weighted",
                                  "marginal-kl", "marginal-rkl-T2"])
def test_gradcheck(name):
    case = make_case(vs=9, vt=11, hs=4, ht=3, seed=10, layouts=LAYOUTS[:2])
    g = torch.Generator().manual_seed(1)
    case.match = synthetic_match(torch.arange(6), torch.randperm(11, generator=g)[:6], 9, 11, g)
    method = METHODS[name][0](case)
    method.chunk_size = 2
    teacher_hidden = case.teacher_hidden[method.teacher_rows(case.batch)]

    def f(h, w, b):
        return method(h, LMHead(w, b), teacher_hidden, case.batch, case.targets).loss

    inputs = [t.detach().clone().requires_grad_(True) for t in case.params()]
    assert torch.autograd.gradcheck(f, tuple(inputs), fast_mode=True)


def test_gradcheck_dskd():
    """DSKD stops gradients on purpose (the projected teacher distribution is a target for the
    student; the student head is frozen in the t2s path), so only the student hidden states and
    the s2t projector see every path a finite difference sees."""
    case = make_case(vs=9, vt=11, hs=4, ht=3, seed=10, layouts=LAYOUTS[:2])
    case.match = VocabMatch(torch.arange(6), torch.randperm(11, generator=torch.Generator().manual_seed(1))[:6], 9, 11)
    projectors = projectors_for(case)
    method = DSKDLoss(case.teacher_head, projectors, cfg("jsd", beta=0.4), chunk_size=2)
    teacher_hidden = case.teacher_hidden[method.teacher_rows(case.batch)]
    head = LMHead(case.student_head.weight.detach(), case.student_head.bias.detach())

    def f(h, s2t):
        method.parameters = lambda: [projectors.t2s.weight.detach(), s2t]
        return method(h, head, teacher_hidden, case.batch, case.targets).loss

    inputs = (case.student_hidden.detach().clone().requires_grad_(True),
              projectors.s2t.weight.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_wrong_teacher_rows_are_refused():
    case = make_case(seed=11)
    loss = OverlapLoss(case.teacher_head, case.match, cfg("kl"))
    with pytest.raises(ValueError, match="the teacher sent .* hidden states, the alignment needs"):
        loss(case.student_hidden, case.student_head, case.teacher_hidden, case.batch, case.targets)
