"""Loss masks on every data format: decode exactly which tokens are trained."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kdlib.config import DataConfig, DataFormat
from kdlib.data.batching import collate
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import build_samples
from kdlib.demo.text import write_jsonl

SYSTEM = "Answer briefly."
Q1, A1 = "What is the capital of France?", "The capital of France is Paris."
Q2, A2 = "Two plus three?", "Two plus three equals five."

ROWS = {
    DataFormat.messages: {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2}, {"role": "assistant", "content": A2},
    ]},
    DataFormat.sharegpt: {"conversations": [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
        {"from": "human", "value": Q2}, {"from": "gpt", "value": A2},
    ]},
    DataFormat.prompt_response: {"prompt": Q2, "response": A2},
    DataFormat.alpaca: {"instruction": Q2, "input": "", "output": A2},
}


def _trained_text(tokenizer, sample) -> tuple[str, str]:
    """(decoded trained targets, decoded prompt) of one sample, through the real collate path."""
    batch = collate([sample], student_pad_id=tokenizer.pad_token_id).student
    targets = batch.targets().tolist()
    prompt = sample.student.input_ids[: sample.student.response_start]
    return tokenizer.decode(targets), tokenizer.decode(prompt)


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_loss_mask_covers_last_assistant_turn_only(fmt, template, tmp_path, chatml_tokenizer_dir, llama3_tokenizer_dir):
    tok_dir = chatml_tokenizer_dir if template == "chatml" else llama3_tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]] * 2)
    samples, report = build_samples(DataConfig(train=str(path)), "train", ChatEncoder(tokenizer))
    assert report.kept == 2 and not report.dropped
    trained, prompt = _trained_text(tokenizer, samples[0])
    end = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    assert trained == A2 + end  # the response and the end-of-turn token, nothing else
    assert prompt.endswith("assistant\n" if template == "chatml" else "assistant<|end_header_id|>\n\n")
    assert Q2 in prompt
    if fmt in (DataFormat.messages, DataFormat.sharegpt):
        assert A1 in prompt and SYSTEM in prompt  # earlier turns are context, not targets


def test_auto_detection_and_explicit_format(tmp_path, chatml_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": Q1, "answer": A1}])
    cfg = DataConfig(train=str(path), format=DataFormat.prompt_response, prompt_key="question", response_key="answer")
    samples, _ = build_samples(cfg, "train", ChatEncoder(tokenizer))
    assert _trained_text(tokenizer, samples[0])[0] == A1 + "<|im_end|>"


def test_alpaca_input_is_part_of_the_prompt(tmp_path, chatml_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Summarize.", "input": "A long text.", "output": "Short."}])
    samples, _ = build_samples(DataConfig(train=str(path)), "train", ChatEncoder(tokenizer))
    trained, prompt = _trained_text(tokenizer, samples[0])
    assert "Summarize.\n\nA long text." in prompt and trained == "Short.<|im_end|>"


def test_without_chat_template_the_response_ends_with_eos(tmp_path, chatml_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": Q1, "response": A1}])
    cfg = DataConfig(train=str(path), apply_chat_template=False)
    samples, _ = build_samples(cfg, "train", ChatEncoder(tokenizer, apply_chat_template=False))
    trained, prompt = _trained_text(tokenizer, samples[0])
    assert prompt == Q1 + "\n" and trained == A1 + tokenizer.eos_token


def test_saved_dataset_directory_and_parquet(tmp_path, chatml_tokenizer_dir):
    import datasets

    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    rows = [ROWS[DataFormat.prompt_response]] * 3
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for spec in (tmp_path / "saved", tmp_path / "d.parquet"):
        samples, report = build_samples(DataConfig(train=str(spec)), "train", ChatEncoder(tokenizer))
        assert report.kept == 3 and len(samples) == 3


def test_batch_loss_mask_alignment_with_padding(tmp_path, chatml_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    short = {"messages": [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]}
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[DataFormat.messages], short])
    samples, _ = build_samples(DataConfig(train=str(path)), "train", ChatEncoder(tokenizer))
    batch = collate(samples, student_pad_id=tokenizer.pad_token_id).student
    assert batch.loss_mask.sum() == sum(s.student.n_loss_tokens for s in samples)
    # the loss never reads a padded position, and never predicts a pad
    assert not (batch.loss_mask & (batch.attention_mask == 0)).any()
    assert batch.loss_mask[:, -1].sum() == 0


def test_row_limits_are_counted(tmp_path, chatml_tokenizer_dir):
    """data.max_samples / data.eval_max_samples read the first rows and count the rest."""
    rows = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(7)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    tokenizer = ChatEncoder(AutoTokenizer.from_pretrained(chatml_tokenizer_dir))
    samples, report = build_samples(DataConfig(train=str(path), eval=str(path), max_samples=3, eval_max_samples=5),
                                    "train", tokenizer)
    assert len(samples) == 3 and report.beyond_limit == 4 and report.as_dict()["beyond_limit"] == 4
    assert "4 further rows not read (data.max_samples=3)" in report.summary()
    held_out, report = build_samples(DataConfig(train=str(path), eval=str(path), eval_max_samples=5), "eval", tokenizer)
    assert len(held_out) == 5 and "2 further rows not read (data.eval_max_samples=5)" in report.summary()
    _, whole = build_samples(DataConfig(train=str(path)), "train", tokenizer)
    assert whole.beyond_limit == 0 and "not read" not in whole.summary()
