"""Resuming reproduces the uninterrupted run: self-distillation teachers and on-policy sampling.

A self-distillation teacher that follows the student (an EMA, or refreshed every N steps) is not
the student at the checkpoint, so its weights travel in the checkpoint; on-policy runs resume the
sampling seeds, the lmbda coin and the data position. Each test checks first that the situation
can tell right from wrong (the teacher at the checkpoint differs from the student), then that the
resumed steps equal the uninterrupted ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdlib
from kdlib.controller.checkpointing import TEACHER_WEIGHTS
from kdlib.demo.text import chat_rows, write_jsonl


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def _full_and_resumed(overrides: list[str], tmp_path: Path, resume_step: int):
    full = kdlib.run(kdlib.compose(overrides + [f"output_dir={tmp_path / 'full'}"]))
    checkpoint = full.run_dir / "checkpoints" / f"step_{resume_step}"
    resumed = kdlib.run(kdlib.compose(overrides + [f"train.resume={checkpoint}", f"output_dir={tmp_path / 'resumed'}"]))
    return full, resumed, checkpoint


def _assert_same_steps(full_rows: list[dict], resumed_rows: list[dict], first_step: int) -> None:
    """The resumed run's steps equal the uninterrupted run's, bit for bit."""
    expected = [r for r in full_rows if r["step"] >= first_step]
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in expected] and expected
    for a, b in zip(expected, resumed_rows, strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "lr"):
            assert b[key] == a[key], (b["step"], key)


def _assert_same_student(full, resumed) -> None:
    """The final students are identical, bit for bit."""
    from safetensors.torch import load_file

    a, b = load_file(full.student_dir / "model.safetensors"), load_file(resumed.student_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("follow, resume_step", [("teacher.ema_decay=0.5", 2), ("teacher.update_freq=2", 3)],
                         ids=["ema", "refreshed"])
def test_resumed_self_distillation_teacher_is_restored_exactly(follow, resume_step, tiny_overrides, tmp_path):
    overrides = tiny_overrides + [
        "teacher.from_student=true", follow, "train.max_steps=5", "train.checkpoint_every=1",
        "train.keep_checkpoints=5", "eval.before=false", "algorithm.kd_ratio=1.0", "train.lr=3e-3",
    ]
    full, resumed, checkpoint = _full_and_resumed(overrides, tmp_path, resume_step)

    # the teacher at the checkpoint is not the student at the checkpoint (EMA: a blend; refreshed
    # every 2 steps: the student of step 2), so restarting it from the student would be wrong
    from safetensors.torch import load_file

    teacher = load_file(checkpoint / TEACHER_WEIGHTS)
    student = _student_weights(checkpoint, tmp_path)
    assert set(teacher) <= set(student)
    differing = [k for k in teacher if not torch.equal(teacher[k], student[k])]
    assert differing, "the checkpoint's teacher equals its student: this test could not fail"

    _assert_same_steps(_rows(full.run_dir), _rows(resumed.run_dir), resume_step + 1)
    _assert_same_student(full, resumed)
    assert "with the self-distillation teacher" in (resumed.run_dir / "kdlib.log").read_text()


def _student_weights(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The student's weights in a (DCP) training checkpoint, by model parameter name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, tmp_path / "student.pt")
    model = torch.load(tmp_path / "student.pt", weights_only=False)["model"]
    return {k.removeprefix("model."): v for k, v in model.items()}


def test_resumed_onpolicy_run_samples_and_trains_as_the_uninterrupted_one(tiny_overrides, tmp_path):
    """Sampled rollouts (temperature 1), the lmbda coin mixing in dataset steps, the data position."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(8, seed=7))
    overrides = tiny_overrides + [
        "+recipe=onpolicy", "loss=kl", f"data.train={prompts}", "data.eval=null", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.max_steps=5", "rollout.max_new_tokens=8", "rollout.temperature=1.0",
        "onpolicy.lmbda=0.6", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.lr=3e-3",
    ]
    full, resumed, _ = _full_and_resumed(overrides, tmp_path, resume_step=2)
    full_rows = _rows(full.run_dir)
    kinds = {r["on_policy"] for r in full_rows if r["step"] > 2}
    assert kinds == {0.0, 1.0}, "steps after the checkpoint should mix rollouts and dataset batches"
    _assert_same_steps(full_rows, _rows(resumed.run_dir), first_step=3)
    assert [r["on_policy"] for r in _rows(resumed.run_dir)] == [r["on_policy"] for r in full_rows[2:]]

    def rollouts(run_dir: Path) -> list[tuple]:
        return [(r["step"], r["index"], r["response"]) for r in _rows(run_dir, "rollouts.jsonl") if r["step"] > 2]

    assert rollouts(resumed.run_dir) == rollouts(full.run_dir) and rollouts(full.run_dir)
    _assert_same_student(full, resumed)


def test_a_resumed_teacher_cache_run_equals_the_uninterrupted_one(tiny_overrides, tmp_path):
    """A run reading (and writing) the teacher cache: the resumed steps and final student are the
    uninterrupted run's, bit for bit, whether the outputs come from the cache or the teacher."""
    overrides = tiny_overrides + [f"teacher.cache={tmp_path / 'cache'}", "train.max_steps=5", "train.checkpoint_every=2",
                                  "train.keep_checkpoints=3", "train.lr=3e-3"]
    full, resumed, _ = _full_and_resumed(overrides, tmp_path, resume_step=2)
    assert all(r["teacher_cached_batches"] == r["micro_batches"] for r in _rows(resumed.run_dir))  # from the cache
    _assert_same_steps(_rows(full.run_dir), _rows(resumed.run_dir), first_step=3)
    _assert_same_student(full, resumed)
