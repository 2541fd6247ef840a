"""The cross-tokenizer algorithms as registry entries, their teacher rows, DSKD's projectors in the
student's optimizer and state, the student's vocabulary transfer, and the tokenizer-free metrics
checked against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdlib
from kdlib.algorithms import ALGORITHMS
from kdlib.algorithms.cross_tokenizer import CrossTokenizerConfig, teacher_hidden_for
from kdlib.evaluation import HeldoutSums, cross_tokenizer_heldout_sums, heldout_sums
from kdlib.losses import LOSSES
from kdlib.models.head import LMHead
from kdlib.teacher_output import TeacherOutput
from kdlib.xtok.alignment import SampleAlignment
from kdlib.xtok.groups import AlignmentBatch, RowKind, SentRows
from kdlib.xtok.overlap import OverlapLoss
from kdlib.xtok.vocab import VocabMatch


def alignment_of_two_samples() -> AlignmentBatch:
    """Sample 0: student tokens (a)(b c)(d), teacher (A B)(C)(D); sample 1: (e)(f), (E)(F G):
    6 student rows, 7 teacher rows, two 1:1 groups (student row 3, teacher row 3; 4 and 4)."""
    first = SampleAlignment((0, 1, 3, 4), (0, 2, 3, 4), (0, 2, 5, 6), (5, 6, 7, 8), (1, 2, 3, 4), 6, False)
    second = SampleAlignment((0, 1, 2), (0, 1, 3), (0, 3, 7), (2, 9), (6, 7, 8), 7, False)
    return AlignmentBatch.from_samples([first, second])


@pytest.mark.parametrize("name, overrides, kind", [
    ("overlap", [], RowKind.pairs),
    ("uld", [], RowKind.group_starts),
    ("uld", ["algorithm.merge_groups=true"], RowKind.group_rows),
    ("gold", [], RowKind.group_rows),
    ("dskd", [], RowKind.pairs),
    ("marginal", [], RowKind.group_starts),
])
def test_registered_with_typed_options_and_their_teacher_rows(name, overrides, kind):
    cfg = kdlib.compose([f"algorithm={name}", *overrides])
    entry = ALGORITHMS.entry(name)
    assert isinstance(cfg.algorithm, CrossTokenizerConfig) and entry.config_cls is type(cfg.algorithm)
    assert entry.load().needs_alignment and entry.load().teacher_row_kind(cfg.algorithm) is kind
    assert not ALGORITHMS.get("vanilla").needs_alignment and ALGORITHMS.get("vanilla").teacher_row_kind(cfg.algorithm) is None


@pytest.mark.parametrize("bad, message", [
    (["algorithm=overlap", "algorithm.kd_ratio=1.5"], "kd_ratio must be in"),
    (["algorithm=uld", "algorithm.teacher_temperature=0"], "uld temperatures must be > 0"),
    (["algorithm=gold", "algorithm.matched_weight=-1"], "gold matched_weight must be >= 0"),
    (["algorithm=dskd", "algorithm.projector_lr=0"], "projector_lr must be positive"),
    (["algorithm=marginal", "algorithm.empty_floor=0"], "marginal empty_floor must be in"),
    (["algorithm=dskd", "+recipe=self_distill"], "a self-distillation teacher updated from the student"),
])
def test_bad_options_fail_at_composition(bad, message):
    with pytest.raises(kdlib.ConfigError, match=message):
        kdlib.compose(bad)


def test_teacher_rows_as_sent_or_picked_from_every_row():
    alignment = alignment_of_two_samples()
    method = OverlapLoss(LMHead(torch.randn(10, 3)), VocabMatch(torch.arange(10), torch.arange(10), 10, 10),
                         LOSSES.entry("kl").config_cls())
    every = torch.randn(alignment.n_teacher_rows, 3)
    rows = alignment.rows(RowKind.pairs).teacher_rows
    assert rows.tolist() == [3, 4]  # the 1:1 groups (d, D) and (e, E)
    picked = teacher_hidden_for(method, alignment, TeacherOutput(hidden=every))
    sent = teacher_hidden_for(method, alignment, TeacherOutput(hidden=every[rows], alignment=SentRows(rows)))
    assert torch.equal(picked, every[rows]) and torch.equal(sent, every[rows])
    with pytest.raises(ValueError, match="not the 2 rows the OverlapLoss reads"):
        teacher_hidden_for(method, alignment, TeacherOutput(hidden=every[:2], alignment=SentRows(torch.tensor([2, 3]))))
    with pytest.raises(ValueError, match="6 hidden-state rows for 7 teacher loss tokens"):
        teacher_hidden_for(method, alignment, TeacherOutput(hidden=every[:6]))


def _reference_nll(hidden, weight, targets) -> float:
    logits = hidden.double() @ weight.double().T
    return float(-F.log_softmax(logits, -1).gather(1, targets[:, None]).sum())


def test_bits_per_byte_and_agreement_with_one_tokenizer_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    s_hidden, t_hidden = torch.randn(9, 4, generator=g), torch.randn(9, 5, generator=g)
    s_head, t_head = LMHead(torch.randn(12, 4, generator=g)), LMHead(torch.randn(12, 5, generator=g))
    targets = torch.randint(0, 12, (9,), generator=g)
    sums = heldout_sums(s_hidden, s_head, t_hidden, t_head, targets, chunk_size=4)
    sums.student_bytes = sums.teacher_bytes = 31
    out = sums.means()
    assert out["bits_per_byte"] == pytest.approx(_reference_nll(s_hidden, s_head.weight, targets) / 31 / math.log(2), rel=1e-6)
    assert out["teacher_bits_per_byte"] == pytest.approx(
        _reference_nll(t_hidden, t_head.weight, targets) / 31 / math.log(2), rel=1e-6)
    agree = ((s_hidden @ s_head.weight.T).argmax(-1) == (t_hidden @ t_head.weight.T).argmax(-1)).float().mean()
    assert out["top1_agreement"] == pytest.approx(float(agree)) and "kl" in out
    without_teacher = heldout_sums(s_hidden, s_head, None, None, targets).means()
    assert set(without_teacher) == {"ce", "ece", "tokens"}  # no teacher: nothing about it, no bytes given


def test_cross_tokenizer_metrics_match_a_float64_reference():
    g = torch.Generator().manual_seed(1)
    alignment = alignment_of_two_samples()
    s_hidden = torch.randn(alignment.n_student_rows, 4, generator=g)
    t_hidden = torch.randn(alignment.n_teacher_rows, 5, generator=g)
    s_head, t_head = LMHead(torch.randn(11, 4, generator=g)), LMHead(torch.randn(10, 5, generator=g))
    match = VocabMatch(torch.tensor([1, 2, 5, 6, 7]), torch.tensor([0, 3, 6, 7, 9]), 11, 10)
    # make the first 1:1 pair agree (student 5 <-> teacher 6) and the second disagree (a student
    # token with no teacher counterpart)
    s_hidden[3], t_hidden[3] = s_head.weight[5] * 5, t_head.weight[6] * 5
    s_hidden[4] = s_head.weight[10] * 5
    sums = cross_tokenizer_heldout_sums(s_hidden, s_head, t_hidden, t_head, alignment, match, chunk_size=2)
    assert sums.ce == pytest.approx(_reference_nll(s_hidden, s_head.weight, alignment.student_ids), rel=1e-6)
    assert sums.teacher_nll == pytest.approx(_reference_nll(t_hidden, t_head.weight, alignment.teacher_ids), rel=1e-6)
    assert (sums.tokens, sums.teacher_tokens, sums.top1_compared) == (6, 7, 2)
    to_student = {t: s for s, t in zip(match.student_ids.tolist(), match.teacher_ids.tolist())}
    agree = 0
    for s_row, t_row in [(3, 3), (4, 4)]:  # the 1:1 groups: student row, teacher row
        s_top = int((s_hidden[s_row] @ s_head.weight.T).argmax())
        t_top = int((t_hidden[t_row] @ t_head.weight.T).argmax())
        agree += int(to_student.get(t_top) == s_top)
    assert sums.top1_agree == agree == 1
    with pytest.raises(ValueError, match="needs the teacher's 7 loss rows"):
        cross_tokenizer_heldout_sums(s_hidden, s_head, t_hidden[:3], t_head, alignment, match)


def test_heldout_sums_add_up():
    a = HeldoutSums(ce=2.0, tokens=2, student_bytes=5, teacher_nll=1.0, teacher_tokens=3, teacher_bytes=5)
    b = HeldoutSums(ce=4.0, tokens=3, student_bytes=7, teacher_nll=2.0, teacher_tokens=4, teacher_bytes=7)
    out = a.add(b).means()
    assert out["bits_per_byte"] == pytest.approx(6.0 / 12 / math.log(2))
    assert out["teacher_bits_per_byte"] == pytest.approx(3.0 / 12 / math.log(2))


def test_dskd_projectors_train_with_the_student_at_their_own_rate_and_stay_out_of_its_state(tiny_llama):
    from transformers import AutoModelForCausalLM

    from kdlib.algorithms.objective import StudentObjective
    from kdlib.models.head import lm_head_of
    from kdlib.optim import build_optimizer
    from kdlib.parallel.checkpoint import full_model_state

    cfg = kdlib.compose(["algorithm=dskd", "algorithm.projector_lr=0.25", "train.lr=1e-3"])
    student = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    teacher_head = lm_head_of(student).detached()
    vocab = teacher_head.vocab_size
    algorithm = ALGORITHMS.get("dskd")(cfg.algorithm, cfg.loss, teacher_head)
    assert algorithm.modules() == {}  # built when attached to a student
    algorithm.attach(student, VocabMatch(torch.arange(vocab), torch.arange(vocab), vocab, vocab))
    projectors = algorithm.modules()["dskd_projectors"]
    eye = torch.eye(teacher_head.hidden_size)
    torch.testing.assert_close(projectors.t2s.weight, eye, atol=1e-4, rtol=0)  # identical heads: identity
    objective = StudentObjective(student, algorithm, device_type="cpu")
    names = dict(objective.named_parameters())
    assert names["algorithm_modules.dskd_projectors.t2s.weight"] is projectors.t2s.weight
    optimizer = build_optimizer(objective, cfg.train, lr_by_prefix={"algorithm_modules.": algorithm.modules_lr()})
    groups = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert groups[id(projectors.t2s.weight)] == groups[id(projectors.s2t.weight)] == 0.25
    assert groups[id(student.model.layers[0].mlp.up_proj.weight)] == 1e-3
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    exported = full_model_state(objective)
    assert set(exported) == set(student.state_dict()) and not any("projector" in k for k in exported)


def test_the_student_gets_the_configured_tokenizers_vocabulary(tiny_llama, unigram_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlib.config.schema import StudentConfig
    from kdlib.models.student import build_model
    from kdlib.xtok.transfer import transfer_plan

    new, old = AutoTokenizer.from_pretrained(str(unigram_tokenizer_dir)), AutoTokenizer.from_pretrained(str(tiny_llama))
    source = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    model = build_model(StudentConfig(model=str(tiny_llama), tokenizer=str(unigram_tokenizer_dir), num_layers=2),
                        torch.device("cpu"))
    assert model.config.vocab_size == len(new) != len(old) and model.config.num_hidden_layers == 2
    plan, _ = transfer_plan(old, new)
    old_rows = source.get_input_embeddings().weight.detach().double()
    for new_id in (5, 100, len(new) - 1):
        expected = old_rows[plan[new_id]].mean(0) if plan[new_id] else old_rows[: len(old)].mean(0)
        torch.testing.assert_close(model.get_input_embeddings().weight[new_id].double(), expected, rtol=1e-6, atol=1e-6)
    same = build_model(StudentConfig(model=str(tiny_llama), tokenizer=str(tiny_llama)), torch.device("cpu"))
    torch.testing.assert_close(same.get_input_embeddings().weight, source.get_input_embeddings().weight)
