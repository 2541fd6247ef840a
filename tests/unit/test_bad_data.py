"""Bad data gets a clear error naming the file and row, or a counted drop; never a deep crash."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kdlib.config import DataConfig, Overlong
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import build_samples
from kdlib.errors import DataError
from kdlib.testing import write_jsonl


@pytest.fixture(scope="module")
def encoder(chatml_tokenizer_dir):
    return ChatEncoder(AutoTokenizer.from_pretrained(chatml_tokenizer_dir))


def _build(path, encoder, **kwargs):
    return build_samples(DataConfig(train=str(path), **kwargs), "train", encoder)


def test_missing_file_names_the_key_and_path(tmp_path, encoder):
    with pytest.raises(DataError, match=r"data.train: file not found: .*nope.jsonl"):
        _build(tmp_path / "nope.jsonl", encoder)


def test_missing_key_names_file_row_and_key(tmp_path, encoder):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"response": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl, row 2: missing key 'prompt'"):
        _build(path, encoder)


def test_message_without_role_names_the_row(tmp_path, encoder):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"content": "hi"}]}])
    with pytest.raises(DataError, match=r"row 1: message 0 must have 'role' and 'content'"):
        _build(path, encoder)


def test_unknown_layout_lists_the_columns(tmp_path, encoder):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"cannot tell the data format from columns \['answer', 'question'\]"):
        _build(path, encoder)


def test_invalid_json_line_is_named(tmp_path, encoder):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", response\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: invalid JSON"):
        _build(path, encoder)


def test_conversation_must_end_with_assistant(tmp_path, encoder):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"row 1: the conversation must end with an assistant message"):
        _build(path, encoder)


def test_empty_response_is_dropped_and_counted(tmp_path, encoder):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a question", "response": "an answer"},
        {"prompt": "a question", "response": "   "},
    ])
    samples, report = _build(path, encoder)
    assert len(samples) == 1 and report.dropped == {"empty response": 1}
    assert "1 dropped (empty response)" in report.summary()


def test_overlong_samples_truncated_or_dropped_and_counted(tmp_path, encoder):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 40
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "short question", "response": "short answer"},
        {"prompt": "short question", "response": long_answer},
        {"prompt": "long question " * 200, "response": "short answer"},
    ])
    samples, report = _build(path, encoder, max_len=64)
    assert report.kept == 2 and report.truncated == 1
    assert report.dropped == {"prompt longer than data.max_len=64": 1}
    assert all(len(s.student) <= 64 for s in samples)
    assert samples[1].student.n_loss_tokens == 64 - samples[1].student.response_start

    samples, report = _build(path, encoder, max_len=64, overlong=Overlong.drop)
    assert report.kept == 1 and report.truncated == 0
    assert report.dropped == {"longer than data.max_len=64": 2}


def test_wrong_types_are_named(tmp_path, encoder):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": 3}])
    with pytest.raises(DataError, match=r"row 1: response must be text, got int"):
        _build(path, encoder)


def test_unsupported_file_type(tmp_path, encoder):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        _build(path, encoder)
