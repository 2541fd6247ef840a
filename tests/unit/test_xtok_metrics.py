"""Tokenizer-free metrics: bits per byte and top-1 agreement at 1:1 groups, against hand computations."""

from __future__ import annotations

import math

import torch

from kdlib.models.head import LMHead
from kdlib.xtok.alignment import align
from kdlib.xtok.groups import AlignmentBatch, RowKind
from kdlib.xtok.metrics import BitsPerByteSums, bits_per_byte_sums, token_nll, top1_agreement
from kdlib.xtok.offsets import ResponseTokens
from kdlib.xtok.vocab import VocabMatch


def random_head(vocab, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    return LMHead(torch.randn(vocab, hidden, generator=g, dtype=torch.float64),
                  torch.randn(vocab, generator=g, dtype=torch.float64))


def test_bits_per_byte_by_hand():
    g = torch.Generator().manual_seed(0)
    head = random_head(17, 6, 1)
    hidden = torch.randn(11, 6, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 17, (11,), generator=g)
    text_bytes = torch.tensor([23, 19])
    logits = hidden @ head.weight.t() + head.bias
    nll = sum(-(logits[i] - torch.logsumexp(logits[i], 0))[targets[i]] for i in range(11))
    for chunk in (1, 4, 100):
        sums = bits_per_byte_sums(hidden, head, targets, text_bytes, chunk_size=chunk)
        assert math.isclose(sums.bits_per_byte, float(nll) / 42 / math.log(2), rel_tol=1e-12)
    assert sums.tokens == 11 and sums.text_bytes == 42 and math.isclose(sums.tokens_per_byte, 11 / 42)
    halves = bits_per_byte_sums(hidden[:5], head, targets[:5], text_bytes[:1]).add(
        bits_per_byte_sums(hidden[5:], head, targets[5:], text_bytes[1:]))
    assert math.isclose(halves.bits_per_byte, sums.bits_per_byte, rel_tol=1e-12)


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte():
    row = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    head = LMHead(row.repeat(32, 1))  # every vocabulary row equal: uniform next-token distribution
    hidden = torch.randn(10, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sums = bits_per_byte_sums(hidden, head, torch.arange(10) * 3, torch.tensor([40]))
    assert math.isclose(sums.bits_per_byte, 10 * 5 / 40, rel_tol=1e-12)  # log2(32) = 5 bits per token
    assert torch.allclose(token_nll(hidden, head, torch.arange(10)), torch.full((10,), math.log(32), dtype=torch.float64))


def alignment_batch():
    s = ResponseTokens((3, 1, 4, 1, 5, 9), (2, 3, 5, 6, 8), "x" * 8, True)
    t = ResponseTokens((2, 7, 1, 8, 2, 8, 1), (2, 4, 5, 6, 7, 8), "x" * 8, True)
    return AlignmentBatch.from_samples([align(s, t, row="r")])


def test_top1_agreement_at_one_to_one_groups():
    batch = alignment_batch()
    student, teacher = random_head(10, 5, 3), random_head(12, 4, 4)
    match = VocabMatch(torch.tensor([0, 2, 3, 5, 7, 9]), torch.tensor([11, 0, 3, 4, 8, 6]), 10, 12)
    g = torch.Generator().manual_seed(5)
    s_hidden = torch.randn(batch.n_student_rows, 5, generator=g, dtype=torch.float64)
    pairs = batch.rows(RowKind.pairs)
    t_hidden = torch.randn(pairs.teacher_rows.shape[0], 4, generator=g, dtype=torch.float64)
    to_student = dict(zip(match.teacher_ids.tolist(), match.student_ids.tolist()))
    expected = 0
    for u in range(pairs.n_units):
        s_top = int(student.logits(s_hidden[pairs.student_start[u]]).argmax())
        t_top = int(teacher.logits(t_hidden[pairs.teacher_start[u]]).argmax())
        expected += int(to_student.get(t_top) == s_top)
    assert top1_agreement(s_hidden, student, t_hidden, teacher, batch, match, chunk_size=2) == (expected, pairs.n_units)
    assert pairs.n_units == 3  # bytes [0, 2) and [5, 6) are 1:1 groups, and the end-of-turn pair
    # the same model on both sides, identical vocabularies: full agreement
    same = VocabMatch(torch.arange(10), torch.arange(10), 10, 10)
    agree, total = top1_agreement(s_hidden, student, s_hidden[pairs.student_start], student, batch, same)
    assert agree == total == 3


def test_sums_add_up():
    a, b = BitsPerByteSums(3.0, 10, 4), BitsPerByteSums(1.0, 6, 2)
    assert a.add(b) == BitsPerByteSums(4.0, 16, 6)
