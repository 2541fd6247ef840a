"""Bad data gets a clear error naming the file and row, or a counted drop; never a deep crash."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kdlib.config import DataConfig, Overlong
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import build_samples
from kdlib.errors import DataError
from kdlib.demo.text import write_jsonl


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


@pytest.mark.parametrize("name, content, line", [
    ("d.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "c"}\n', 2),
    ("d.csv", b"prompt,response\na,b\nc,d\ncaf\xe9,e\n", 4),
    ("d.json", b'[{"prompt": "a", "response": "b"},\n {"prompt": "caf\xe9", "response": "c"}]', 2),
    ("d.json", b'[{"prompt": "a", "response": "\xe2\x82"}]', 1),  # a character cut short at the end of the file
])
def test_text_that_is_not_utf8_names_file_and_line(name, content, line, tmp_path, encoder):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        _build(path, encoder)
    assert str(caught.value).startswith(f"data.train: {path}, line {line}: not UTF-8 text (byte 0x")
    assert str(caught.value).endswith("save the file as UTF-8") and "\n" not in str(caught.value)


def test_not_utf8_far_into_a_large_file_is_found_across_chunks(tmp_path):
    from kdlib.data.sources import _check_utf8

    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,response\n" + b"".join(b"p%d,\xc3\xa9t\xc3\xa9 %d\n" % (i, i) for i in range(3000))
                     + b"bad,\xff\n")
    with pytest.raises(DataError, match=r"d.csv, line 3002: not UTF-8 text \(byte 0xff: invalid start byte\)"):
        _check_utf8(path, "data.train", chunk_bytes=4096)  # multi-byte characters straddle the chunks
    fine = tmp_path / "fine.csv"
    fine.write_text("a,\u00e9t\u00e9 \u2603\n", encoding="utf-8")
    _check_utf8(fine, "data.train", chunk_bytes=1)  # every character split across reads: still UTF-8


@pytest.mark.parametrize("name, content, cause", [
    ("d.json", '[{"prompt": "a", "response": "b"}, {"prompt": "x"', "data.train: cannot read {path}: "),
    ("d.parquet", "PAR1 not really", "Parquet magic bytes not found"),
])
def test_files_datasets_cannot_parse_are_one_line_with_the_cause(name, content, cause, tmp_path, encoder, capfd):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        _build(path, encoder)
    assert cause.format(path=path) in str(caught.value) and "\n" not in str(caught.value)
    assert "An error occurred while generating the dataset" not in str(caught.value)
    assert "Failed to read file" not in capfd.readouterr().err  # datasets' own log line is not shown too


def test_a_chat_template_that_fails_names_the_model_and_the_row(tmp_path, chatml_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yo"}]},
    ])
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('system messages are not supported') }}"
        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError) as caught:
        _build(path, ChatEncoder(tokenizer, name="student"))
    assert str(caught.value) == (f"data.train: {path}, row 2: the student chat template fails on this conversation: "
                                 "system messages are not supported")
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(DataError) as caught:
        _build(path, ChatEncoder(tokenizer, name="teacher"))
    assert str(caught.value) == "the teacher chat template has a syntax error (line 1: unexpected '}')"
