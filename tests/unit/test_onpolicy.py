"""On-policy pieces: rollout samples and their loss mask, weight sync, EMA and refreshed teachers,
privileged context, lmbda mixing."""

from __future__ import annotations

import pytest
import torch

import kdlib
from kdlib.data.batching import collate
from kdlib.data.samples import Prompt, rollout_sample
from kdlib.runner import built
from kdlib.demo.text import chat_rows, write_jsonl

EOS = 2


def test_loss_mask_covers_exactly_the_generated_tokens():
    prompt = Prompt(index=0, student_ids=[1, 10, 11, 12])
    finished = [20, 21, 22, EOS]  # ended with the end-of-turn token
    cut = [30, 31, 32, 33]  # cut by max_new_tokens: no end token, and none is added
    for generated in (finished, cut):
        sample, shortened = rollout_sample(prompt, generated, max_len=64)
        assert not shortened and sample.student.input_ids == prompt.student_ids + generated
        batch = collate([sample], student_pad_id=0).student
        assert batch.targets().tolist() == generated
        assert batch.loss_mask[0].nonzero().flatten().tolist() == [3, 4, 5, 6]
    sample, shortened = rollout_sample(prompt, cut, max_len=6)
    assert shortened and collate([sample], student_pad_id=0).student.targets().tolist() == [30, 31]


def test_privileged_prompt_is_the_teachers_and_the_response_is_shared():
    prompt = Prompt(index=3, student_ids=[1, 10], teacher_ids=[1, 50, 51, 52])
    sample, _ = rollout_sample(prompt, [20, 21, EOS], max_len=64)
    batch = collate([sample], student_pad_id=0, teacher_pad_id=0)
    assert batch.teacher.input_ids[0].tolist() == [1, 50, 51, 52, 20, 21, EOS]
    assert batch.teacher.targets().tolist() == batch.student.targets().tolist() == [20, 21, EOS]


@pytest.fixture
def prompts4(tmp_path):
    rows = chat_rows(4, seed=7)
    for row in rows:  # a privileged teacher prompt for context distillation
        row["teacher_prompt"] = "Hint: answer in one short sentence. " + row["messages"][-2]["content"]
    return write_jsonl(tmp_path / "p4.jsonl", rows)


def _onpolicy(tiny_overrides, prompts4, extra=()):
    return kdlib.compose(tiny_overrides + [
        "+recipe=onpolicy", "loss=kl", f"data.train={prompts4}", "data.eval=null", "train.global_batch_size=4",
        "train.epochs=4", "train.max_steps=4", "rollout.max_new_tokens=6", "rollout.temperature=0",
        "train.warmup_ratio=0", *extra,
    ])


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_rollout_engine_gets_the_students_weights_bit_for_bit(tiny_overrides, prompts4):

    with built(_onpolicy(tiny_overrides, prompts4), run_dir=None) as loop:
        loop.start(1)
        batches = loop.sample_batches()
        student = loop.pipeline.students.group.workers[0].model
        engine = loop.pipeline.rollout.group.workers[0].backend.model
        for step in (1, 2):
            before = _params(engine)
            loop.step(next(batches), step)
            after = _params(engine)
            for name, value in _params(student).items():
                assert value.dtype == torch.float32
                assert torch.equal(after[name], value), name
            assert any(not torch.equal(before[n], after[n]) for n in before)  # it did change


def test_ema_teacher_follows_its_formula(tiny_overrides, prompts4):

    decay = 0.6
    cfg = _onpolicy(tiny_overrides, prompts4, ["teacher.from_student=true", "teacher.dtype=float32", f"teacher.ema_decay={decay}"])
    with built(cfg, run_dir=None) as loop:
        student = loop.pipeline.students.group.workers[0].model
        teacher = loop.pipeline.teacher.group.workers[0].backend.model
        expected = _params(student)
        assert all(torch.equal(expected[n], v) for n, v in _params(teacher).items())  # starts as the student
        loop.start(1)
        batches = loop.sample_batches()
        for step in (1, 2, 3):
            loop.step(next(batches), step)
            current = _params(student)
            expected = {n: decay * expected[n] + (1 - decay) * current[n] for n in expected}
            for name, value in _params(teacher).items():
                torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)
        head = loop.pipeline.students.group.workers[0].objective.algorithm.teacher_head
        torch.testing.assert_close(head.weight, _params(teacher)["lm_head.weight"])  # the student uses the new head


def test_update_freq_one_makes_the_teacher_the_previous_student(tiny_overrides, prompts4):

    cfg = _onpolicy(tiny_overrides, prompts4, ["teacher.from_student=true", "teacher.dtype=float32", "teacher.update_freq=1"])
    with built(cfg, run_dir=None) as loop:
        student = loop.pipeline.students.group.workers[0].model
        teacher = loop.pipeline.teacher.group.workers[0].backend.model
        loop.start(1)
        batches = loop.sample_batches()
        previous = _params(student)
        for step in (1, 2, 3):
            samples = next(batches)
            assert all(torch.equal(v, previous[n]) for n, v in _params(teacher).items())  # scoring this step
            loop.step(samples, step)
            previous = _params(student)
            assert all(torch.equal(v, previous[n]) for n, v in _params(teacher).items())


def test_context_distillation_teacher_reads_the_privileged_prompt(tiny_overrides, prompts4):
    cfg = _onpolicy(tiny_overrides, prompts4, ["teacher.from_student=true", "data.teacher_input_key=teacher_prompt"])
    with built(cfg, run_dir=None) as loop:
        tokenizer = loop.pipeline.data.student_encoder.tokenizer
        for prompt in loop.pipeline.data.prompts:
            assert "Hint: answer in one short sentence." in tokenizer.decode(prompt.teacher_ids)
            assert "Hint:" not in tokenizer.decode(prompt.student_ids)


def test_lmbda_mixes_dataset_steps_in(tiny_overrides, prompts4, tmp_path):
    import json

    cfg = _onpolicy(tiny_overrides, prompts4, ["onpolicy.lmbda=0.5", "train.max_steps=8", "train.epochs=8",
                                               f"output_dir={tmp_path / 'mix'}", "eval.before=false"])
    result = kdlib.run(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["on_policy"] for r in rows]
    assert 0.0 in kinds and 1.0 in kinds
    logged_steps = {json.loads(line)["step"] for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()}
    assert logged_steps == {r["step"] for r in rows if r["on_policy"] == 1.0}
