"""The row contract with real models: alignment rows index the hidden states the workers gather.

Two tiny random models with different tokenizers (a byte-level BPE Llama teacher, a metaspace
Unigram Qwen3 student with tied embeddings) read the same conversations through their own chat
templates; kdlib's collate builds both sides' batches (padded or packed) exactly as the pipeline
does, and the hidden states at the loss positions are gathered as the workers gather them. The
groups must point at the rows whose model logits predict the group's tokens: the overlap loss
computed from the models' own full logits at those positions must equal the method's value.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kdlib.data.batching import collate
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import Sample, Sequence
from kdlib.losses import LOSSES
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import lm_head_of
from kdlib.xtok.alignment import align
from kdlib.xtok.dskd import DSKDLoss, DSKDProjectors
from kdlib.xtok.gold import GOLDLoss
from kdlib.xtok.groups import AlignmentBatch
from kdlib.xtok.offsets import response_tokens
from kdlib.xtok.overlap import OverlapLoss
from kdlib.xtok.uld import ULDConfig, ULDLoss
from kdlib.xtok.vocab import match_vocabularies

TEXTS = ["The capital of France is Paris. Café au lait, s'il vous plaît!",
         "Two plus three equals 5; 中文 and 🎉 too.",
         "def add(a, b):\n    return a + b\n"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlib.demo.text import build_model, build_tokenizer, build_unigram_tokenizer

    root = tmp_path_factory.mktemp("xtok_e2e")
    build_tokenizer(root / "bpe")
    build_unigram_tokenizer(root / "unigram")
    build_model(root / "teacher", arch="llama", tokenizer_dir=root / "bpe", hidden_size=32, num_layers=2, seed=1)
    build_model(root / "student", arch="qwen3", tokenizer_dir=root / "unigram", hidden_size=32, num_layers=2,
                tie_word_embeddings=True, seed=2)
    load = lambda name: AutoModelForCausalLM.from_pretrained(str(root / name), dtype=torch.float32).eval()  # noqa: E731
    return {
        "teacher": (load("teacher"), AutoTokenizer.from_pretrained(str(root / "bpe"))),
        "student": (load("student"), AutoTokenizer.from_pretrained(str(root / "unigram"))),
    }


def build(models, *, student_keep=None):
    """Samples (both sides' sequences) and their alignment, the data side of phase 2."""
    encoders = {side: ChatEncoder(tok, name=side) for side, (_, tok) in models.items()}
    samples, alignments = [], []
    for i, text in enumerate(TEXTS):
        conversation = [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": text}]
        sequences, tokens = {}, {}
        for side, encoder in encoders.items():
            encoded = encoder.encode(conversation, f"row {i}")
            ids = encoded.response_ids
            if side == "student" and student_keep and i == 1:
                ids = ids[:student_keep]  # data.max_len cut this student response
            piece = encoded.response_text
            tokens[side] = response_tokens(encoder.tokenizer, ids, text=piece, model=side, row=f"row {i}",
                                           end_of_turn_ids=encoder.end_of_turn_ids)
            sequences[side] = Sequence(encoded.input_ids[: encoded.response_start] + ids, encoded.response_start)
        samples.append(Sample(index=i, student=sequences["student"], teacher=sequences["teacher"]))
        alignments.append(align(tokens["student"], tokens["teacher"], row=f"row {i}"))
    return samples, AlignmentBatch.from_samples(alignments)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("student_keep", [None, 9])
def test_groups_index_the_rows_the_workers_gather(models, packing, student_keep):
    (teacher, t_tok), (student, s_tok) = models["teacher"], models["student"]
    samples, alignment = build(models, student_keep=student_keep)
    batch = collate(samples, student_pad_id=s_tok.pad_token_id, teacher_pad_id=t_tok.pad_token_id, packing=packing)
    assert batch.student.targets().tolist() == alignment.student_ids.tolist()
    assert batch.teacher.targets().tolist() == alignment.teacher_ids.tolist()
    assert (alignment.unaligned_rows()[0] > 0) == bool(student_keep)

    match = match_vocabularies(s_tok, t_tok)
    loss = OverlapLoss(lm_head_of(teacher), match, LOSSES.entry("kl").config_cls(), chunk_size=16)
    with torch.no_grad():
        s_hidden = hidden_at_loss_positions(student, batch.student)
        t_hidden = hidden_at_loss_positions(teacher, batch.teacher)[loss.teacher_rows(alignment)]
        terms = loss(s_hidden, lm_head_of(student), t_hidden, alignment, batch.student.targets())

        # the same quantity from each model's own full logits at the positions of the 1:1 groups
        expected = 0.0
        for b, sample in enumerate(samples):
            s_logits = student(input_ids=torch.tensor([sample.student.input_ids])).logits[0]
            t_logits = teacher(input_ids=torch.tensor([sample.teacher.input_ids])).logits[0]
            for g in (alignment.sample == b).nonzero().squeeze(-1).tolist():
                if not bool(alignment.one_to_one[g]):
                    continue
                k = int(alignment.student_start[g] - alignment.student_offsets[b])
                j = int(alignment.teacher_start[g] - alignment.teacher_offsets[b])
                q = s_logits[sample.student.response_start + k - 1, match.student_ids]
                p = t_logits[sample.teacher.response_start + j - 1, match.teacher_ids]
                expected += float(LOSSES.get("kl")(q[None], p[None]))
    assert float(terms.kd_sum) == pytest.approx(expected, rel=1e-4)
    assert float(terms.kd_sum) > 0


def test_every_method_trains_the_student(models):
    """Each method, chunked (groups cut across chunks), on real model outputs: its gradient with
    respect to the student's hidden states and head is the derivative of its loss (a finite
    difference along a random direction, float64), and one small gradient step on the whole student
    lowers that loss (the gradient reaches every layer with the right sign)."""
    import copy

    (teacher, t_tok), (student, s_tok) = models["teacher"], models["student"]
    teacher, student = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    samples, alignment = build(models, student_keep=9)
    batch = collate(samples, student_pad_id=s_tok.pad_token_id, teacher_pad_id=t_tok.pad_token_id)
    match = match_vocabularies(s_tok, t_tok)
    kl = LOSSES.entry("kl").config_cls()
    t_head, s_head = lm_head_of(teacher), lm_head_of(student)
    with torch.no_grad():
        teacher_all = hidden_at_loss_positions(teacher, batch.teacher)
    methods = {
        "overlap": OverlapLoss(t_head, match, kl, chunk_size=7),
        "uld": ULDLoss(t_head, ULDConfig(merge_groups=True), chunk_size=7),
        "gold": GOLDLoss(t_head, match, kl, chunk_size=7),
        "dskd": DSKDLoss(t_head, DSKDProjectors.from_heads(s_head, t_head, match).double(), kl, chunk_size=7),
    }
    generator = torch.Generator().manual_seed(0)

    def loss(method, hidden, head) -> torch.Tensor:
        return method(hidden, head, teacher_all[method.teacher_rows(alignment)], alignment,
                      batch.student.targets(), normaliser=batch.n_loss_tokens).loss

    for name, method in methods.items():
        # the method's own derivative, on the student's actual hidden states and head
        hidden = hidden_at_loss_positions(student, batch.student).detach().requires_grad_(True)
        head = lm_head_of(student)
        weight = head.weight.detach().clone().requires_grad_(True)
        loss(method, hidden, replace(head, weight=weight)).backward()
        d_h = torch.randn(hidden.shape, generator=generator, dtype=torch.float64)
        d_w = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        if name == "dskd":  # DSKD reads the student head a second time under a stop-gradient, by design
            d_w.zero_()
        analytic = float((hidden.grad * d_h).sum() + (weight.grad * d_w).sum())
        # ULD's |sorted p_s - sorted p_t| has kinks wherever two sorted probabilities meet, and the
        # small models' many tiny probabilities put some within 1e-6 along a random direction: a
        # difference across a kink mixes two slopes. A step of 1e-8 rarely crosses one, and rarely on
        # both sides, so ULD's derivative must match the central or one of the one-sided differences
        # (float64 rounding leaves ~1e-7 of relative error in each)
        eps, rel = (1e-8, 2e-5) if name == "uld" else (1e-6, 1e-6)
        with torch.no_grad():
            at = float(loss(method, hidden, replace(head, weight=weight)))
            up = float(loss(method, hidden + eps * d_h, replace(head, weight=weight + eps * d_w)))
            down = float(loss(method, hidden - eps * d_h, replace(head, weight=weight - eps * d_w)))
        differences = [(up - down) / (2 * eps)] + ([(up - at) / eps, (at - down) / eps] if name == "uld" else [])
        assert abs(analytic) > 1e-6, name
        assert any(d == pytest.approx(analytic, rel=rel) for d in differences), (name, analytic, differences)
        # one gradient step of the whole student lowers the loss
        student.zero_grad()
        before = loss(method, hidden_at_loss_positions(student, batch.student), lm_head_of(student))
        before.backward()
        grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
        assert any("layers.0." in n and float(g.abs().sum()) > 0 for n, g in grads.items()), name
        with torch.no_grad():
            for p in student.parameters():
                if p.grad is not None:
                    p.sub_(1e-3 * p.grad)
            after = loss(method, hidden_at_loss_positions(student, batch.student), lm_head_of(student))
            for p in student.parameters():
                if p.grad is not None:
                    p.add_(1e-3 * p.grad)  # back to where it was, for the next method
        assert float(after) < float(before), name