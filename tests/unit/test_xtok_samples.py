"""The data side across tokenizers: samples aligned per row, counted filtering, micro-batches that
carry their groups, and the teacher sending only the rows a method reads.

Teacher: kdlib's tiny byte-level BPE with a ChatML template; student: a metaspace Unigram with
split digits, a BOS and byte fallback; the conversations hold multi-byte text (accents, CJK, an
emoji) and digits.
"""

from __future__ import annotations

import pytest
import torch

from kdlib.config.schema import DataConfig, Unalignable
from kdlib.data.batching import collate
from kdlib.data.cross_tokenizer import ResponseAligner
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import Prompt, build_samples, rollout_sample
from kdlib.errors import DataError, ModelError
from kdlib.teacher_output import TeacherOutput
from kdlib.demo.text import write_jsonl
from kdlib.workers.teacher import rows_to_send
from kdlib.xtok.groups import RowKind, SentRows

RESPONSES = [
    "Café crème, naïve façade.",
    "東京で寿司を食べた 🎉 ok",
    "In 2024 we counted 12345 apples.",
    "Knowledge distillation trains a small student model.",
]


@pytest.fixture(scope="module")
def tokenizers(chatml_tokenizer_dir, unigram_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chatml_tokenizer_dir)), AutoTokenizer.from_pretrained(str(unigram_tokenizer_dir))


@pytest.fixture
def data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": text}]}
            for i, text in enumerate(RESPONSES)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def aligner_for(tokenizers):
    bpe, unigram = tokenizers
    student, teacher = ChatEncoder(unigram, name="student"), ChatEncoder(bpe, name="teacher")
    return student, teacher, ResponseAligner(student, teacher, student_model="student S", teacher_model="teacher T")


def test_encode_returns_the_rendered_response_text(tokenizers):
    bpe, _ = tokenizers
    encoded = ChatEncoder(bpe).encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Café 🎉"}], "r")
    assert encoded.response_text == "Café 🎉<|im_end|>\n"
    assert bpe.decode(encoded.response_ids) == "Café 🎉<|im_end|>"
    assert ChatEncoder(bpe).end_of_turn_id == bpe.convert_tokens_to_ids("<|im_end|>")


def test_samples_carry_their_alignment_and_response_bytes(tokenizers, data):
    student, teacher, aligner = aligner_for(tokenizers)
    samples, report = build_samples(DataConfig(train=str(data)), "train", student, teacher, aligner)
    assert report.kept == len(RESPONSES) and not report.dropped and report.unaligned_student_tokens == 0
    for sample, text in zip(samples, RESPONSES):
        alignment = sample.alignment
        s_ids = sample.student.input_ids[sample.student.response_start:]
        t_ids = sample.teacher.input_ids[sample.teacher.response_start:]
        assert list(alignment.student_ids) == s_ids and list(alignment.teacher_ids) == t_ids
        assert s_ids != t_ids  # genuinely different tokens
        assert sample.response_bytes == sample.teacher_response_bytes == alignment.text_bytes == len(text.encode())
        assert alignment.end_of_turn and alignment.byte_bounds[-1] == len(text.encode())
        assert alignment.student_bounds[-1] == len(s_ids) and alignment.teacher_bounds[-1] == len(t_ids)
        # the student's sequence starts with its BOS, the teacher's does not
        bpe, unigram = tokenizers
        assert unigram.convert_ids_to_tokens(sample.student.input_ids[0]) == "<s>"
        assert bpe.convert_ids_to_tokens(sample.teacher.input_ids[0]) == "<|im_start|>"
    shapes = {(len(s), len(t)) for sample in samples for s, t in sample.alignment.groups()}
    assert (1, 1) in shapes and any(a != b for a, b in shapes)  # 1:1 groups and many:1 / 1:many ones


def test_each_side_is_fitted_on_its_own_and_the_tail_is_counted(tokenizers, data):
    student, teacher, aligner = aligner_for(tokenizers)
    full, _ = build_samples(DataConfig(train=str(data)), "train", student, teacher, aligner)
    max_len = min(len(s.student) for s in full) - 3
    cut, report = build_samples(DataConfig(train=str(data), max_len=max_len), "train", student, teacher, aligner)
    assert report.truncated >= 1
    for sample in cut:
        assert len(sample.student) <= max_len and len(sample.teacher) <= max_len
        assert sample.alignment.n_groups > 0
    assert report.unaligned_student_tokens + report.unaligned_teacher_tokens == sum(
        s.alignment.unaligned_student + s.alignment.unaligned_teacher for s in cut
    ) > 0
    assert "unaligned" in report.summary() and report.as_dict()["unaligned_teacher_tokens"] == report.unaligned_teacher_tokens


def test_same_tokenizer_samples_count_their_response_bytes(tokenizers, data):
    """Bits per byte in every run: the bytes of the response text the kept tokens spell."""
    bpe, _ = tokenizers
    encoder = ChatEncoder(bpe, name="student")
    samples, _ = build_samples(DataConfig(train=str(data)), "train", encoder)
    assert [s.response_bytes for s in samples] == [len(t.encode()) for t in RESPONSES]
    assert all(s.alignment is None and s.teacher_response_bytes is None for s in samples)
    cut, _ = build_samples(DataConfig(train=str(data), max_len=len(samples[0].student) - 4), "train", encoder)
    kept = bpe.decode(cut[0].student.input_ids[cut[0].student.response_start:])
    assert cut[0].response_bytes == len(kept.encode()) < len(RESPONSES[0].encode())
    prompt = Prompt(index=0, student_ids=[1, 2])
    sample, _ = rollout_sample(prompt, bpe("Café!", add_special_tokens=False)["input_ids"] + [encoder.end_of_turn_id],
                               max_len=64, encoder=encoder)
    assert sample.response_bytes == len("Café!".encode())


def test_identical_tokenizers_give_only_one_to_one_groups(tokenizers, data):
    bpe, _ = tokenizers
    encoder = ChatEncoder(bpe, name="student")
    aligner = ResponseAligner(encoder, encoder, student_model="s", teacher_model="t")
    samples, _ = build_samples(DataConfig(train=str(data)), "train", encoder, None, aligner)
    for sample in samples:
        assert sample.teacher is None  # the teacher reads the student's tokens
        assert all(len(s) == 1 == len(t) for s, t in sample.alignment.groups())
        assert sample.alignment.n_groups == sample.student.n_loss_tokens


def test_a_response_that_differs_is_an_error_or_dropped_and_counted(tokenizers, data):
    bpe, unigram = tokenizers
    student = ChatEncoder(unigram, name="student")
    shouting = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}" \
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    bpe.chat_template, original = shouting, bpe.chat_template
    try:
        teacher = ChatEncoder(bpe, name="teacher")
        aligner = ResponseAligner(student, teacher, student_model="student (S)", teacher_model="teacher (T)")
        with pytest.raises(DataError, match=r"^data.train: .*train.jsonl, row 1: the response text differs between the "
                                            r"student \(S\) and the teacher \(T\) renderings"):
            build_samples(DataConfig(train=str(data)), "train", student, teacher, aligner)
        samples, report = build_samples(DataConfig(train=str(data), unalignable=Unalignable.drop), "train", student,
                                        teacher, aligner)
    finally:
        bpe.chat_template = original
    assert samples == [] and report.dropped == {"cannot be aligned across the tokenizers": len(RESPONSES)}


def test_a_slow_tokenizer_is_refused_naming_the_model(tokenizers):
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):  # a real slow (Python) tokenizer, no offsets
        def get_vocab(self):
            return {c: i for i, c in enumerate("ab ")}

        @property
        def vocab_size(self):
            return 3

        def _tokenize(self, text, **kwargs):
            return list(text)

    slow_encoder = type("Encoder", (), {"tokenizer": CharTokenizer(), "end_of_turn_ids": {0}})()
    teacher = ChatEncoder(tokenizers[0], name="teacher")
    with pytest.raises(ModelError, match=r"^the student \(my/slow-model\) tokenizer \(CharTokenizer\) is a slow tokenizer"):
        ResponseAligner(slow_encoder, teacher, student_model="student (my/slow-model)", teacher_model="teacher")


@pytest.mark.parametrize("packing", [False, True])
def test_micro_batches_carry_groups_rows_and_bytes(tokenizers, data, packing):
    student, teacher, aligner = aligner_for(tokenizers)
    samples, _ = build_samples(DataConfig(train=str(data)), "train", student, teacher, aligner)
    batch = collate(samples, student_pad_id=student.pad_id, teacher_pad_id=teacher.pad_id, packing=packing,
                    row_kind=RowKind.pairs)
    alignment = batch.alignment
    assert batch.student.targets().tolist() == alignment.student_ids.tolist()
    assert batch.teacher.targets().tolist() == alignment.teacher_ids.tolist()
    assert alignment.n_samples == len(samples) and alignment.n_groups == sum(s.alignment.n_groups for s in samples)
    assert torch.equal(batch.teacher_rows, alignment.rows(RowKind.pairs).teacher_rows)
    assert 0 < batch.teacher_rows.numel() < alignment.n_teacher_rows
    assert batch.response_bytes.tolist() == [len(t.encode()) for t in RESPONSES]
    moved = batch.to("cpu")
    assert moved.alignment is not None and torch.equal(moved.teacher_rows, batch.teacher_rows)
    assert collate(samples, student_pad_id=0, teacher_pad_id=0).teacher_rows is None  # evaluation: every row


def test_the_teacher_sends_only_the_rows_the_method_reads(tokenizers, data):
    student, teacher, aligner = aligner_for(tokenizers)
    samples, _ = build_samples(DataConfig(train=str(data)), "train", student, teacher, aligner)
    batch = collate(samples, student_pad_id=student.pad_id, teacher_pad_id=teacher.pad_id, row_kind=RowKind.group_starts)
    n = batch.teacher.n_loss_tokens
    full = TeacherOutput(hidden=torch.randn(n, 8), row_offsets=torch.cat([torch.zeros(1, dtype=torch.long),
                         batch.teacher.loss_rows_per_sample().cumsum(0)]), sample_ids=torch.arange(len(samples)))
    sent = rows_to_send(full, batch)
    rows = batch.alignment.rows(RowKind.group_starts).teacher_rows
    assert torch.equal(sent.hidden, full.hidden[rows]) and sent.n_rows < n
    per_sample = [int(((rows >= a) & (rows < b)).sum()) for a, b in zip(batch.alignment.teacher_offsets[:-1],
                                                                       batch.alignment.teacher_offsets[1:])]
    assert torch.diff(sent.row_offsets).tolist() == per_sample
    assert isinstance(sent.alignment, SentRows) and torch.equal(sent.alignment.teacher_rows, rows)
    tensors, meta = sent.to_parts()  # what every transport moves
    back = TeacherOutput.from_parts(tensors, meta)
    assert isinstance(back.alignment, SentRows) and torch.equal(back.alignment.teacher_rows, rows)
    batch.teacher_rows = None
    assert rows_to_send(full, batch) is full


def test_rollouts_are_retokenised_for_the_teacher_and_aligned(tokenizers):
    bpe, unigram = tokenizers
    student, teacher, aligner = aligner_for(tokenizers)
    text = "Café 12 🎉"
    sampled = unigram(text, add_special_tokens=False)["input_ids"] + [student.end_of_turn_id]
    prompt = Prompt(index=3, student_ids=[1, 2, 3], teacher_ids=[5, 6])
    sample, cut = rollout_sample(prompt, sampled, max_len=64, encoder=student, aligner=aligner)
    assert not cut and sample.student.input_ids == [1, 2, 3] + sampled
    expected_teacher = bpe(text, add_special_tokens=False)["input_ids"] + [teacher.end_of_turn_id]
    assert sample.teacher.input_ids == [5, 6] + expected_teacher
    assert sample.alignment.end_of_turn and sample.alignment.unaligned_student == 0
    assert sample.response_bytes == sample.teacher_response_bytes == len(text.encode())

    # a student that stops inside a character: the whole-character prefix is aligned, the rest is not
    broken = unigram("ok ", add_special_tokens=False)["input_ids"] + [unigram.convert_tokens_to_ids("<0xC3>")]
    sample, _ = rollout_sample(prompt, broken, max_len=64, encoder=student, aligner=aligner)
    assert sample.student.input_ids[3:] == broken  # the student trains on what it sampled
    assert sample.alignment.unaligned_student == 1 and not sample.alignment.end_of_turn
    assert bpe.decode(sample.teacher.input_ids[2:]) == "ok "
