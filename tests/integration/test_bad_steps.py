"""NaN or inf in the loss or the gradients: the update is skipped, counted, and too many stop the run.

The faults are real: a plugin algorithm (tests/fault_plugins.py) poisons the micro-batches that
hold chosen sample ids, so the NaN or inf goes through the worker's backward, clipping and the
skip decision exactly as a diverging batch would.
"""

from __future__ import annotations

import json

import pytest
import torch

import kdlib
from kdlib.errors import TrainingError
from kdlib.runner import built

POISONED = 5  # a sample id of the 24-row training set


def _cfg(tiny_overrides, *extra):
    return kdlib.compose(tiny_overrides + ["plugins=[fault_plugins]", "algorithm=fault_injection",
                                           "eval.before=false", *extra])


def _snapshot(worker):
    params = {k: v.detach().clone() for k, v in worker.model.state_dict().items()}
    optimizer = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in worker.optimizer.state.items()}
    return params, optimizer, worker.scheduler.last_epoch


@pytest.mark.parametrize("fault", ["nan_samples", "inf_grad_samples"])
def test_a_poisoned_step_changes_nothing_and_the_next_one_trains(fault, tiny_overrides):
    cfg = _cfg(tiny_overrides, f"algorithm.{fault}=[{POISONED}]", "train.max_steps=3")
    with built(cfg, run_dir=None) as loop:
        worker = loop.pipeline.students.group.workers[0]
        batches = loop.sample_batches()
        seen_poison = False
        for step in (1, 2, 3):  # one epoch: the poisoned sample is in exactly one step
            samples = next(batches)
            poisoned = POISONED in [s.index for s in samples]
            params, optimizer, schedule = _snapshot(worker)
            metrics = loop.step(samples, step)
            after_params, after_optimizer, after_schedule = _snapshot(worker)
            assert metrics["skipped"] == float(poisoned)
            if poisoned:
                seen_poison = True
                if fault == "nan_samples":  # the micro-batch with the bad loss is named
                    assert POISONED in metrics["bad_sample_ids"] and metrics["loss"] != metrics["loss"]
                else:  # a finite loss, infinite gradients
                    assert metrics["bad_sample_ids"] == [] and metrics["loss"] == metrics["loss"]
                    assert not torch.isfinite(torch.tensor(metrics["grad_norm"]))
                assert all(torch.equal(params[k], after_params[k]) for k in params)
                assert after_schedule == schedule  # no scheduler step
                assert after_optimizer.keys() == optimizer.keys()
                for key, state in optimizer.items():  # no optimizer step (Adam moments and count)
                    assert all(torch.equal(v, after_optimizer[key][n]) if torch.is_tensor(v) else v == after_optimizer[key][n]
                               for n, v in state.items())
                assert all(p.grad is None for p in worker.objective.parameters())  # gradients dropped
            else:
                assert after_schedule == schedule + 1
                assert any(not torch.equal(params[k], after_params[k]) for k in params)
                assert all(torch.isfinite(v).all() for v in after_params.values())
        assert seen_poison


def test_a_run_survives_a_bad_batch_and_counts_it(tiny_overrides, tmp_path):
    result = kdlib.run(_cfg(tiny_overrides, f"algorithm.nan_samples=[{POISONED}]", "train.max_steps=6",
                            "train.max_skipped_fraction=0.5", f"output_dir={tmp_path / 'run'}"))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert sum(r["skipped"] for r in rows) == 2  # the sample comes once per epoch of 3 steps
    assert rows[-1]["skipped_steps"] == 2
    assert [r["skipped_steps"] for r in rows] == sorted(r["skipped_steps"] for r in rows)
    assert all(r["loss"] == r["loss"] for r in rows if not r["skipped"])
    assert result.eval_after["kl"] == result.eval_after["kl"]  # the student stayed finite
    assert result.student_dir is not None
    # the end of the run says so: results.json, and a row of the held-out table
    skipped = [r["step"] for r in rows if r["skipped"]]
    assert json.loads((result.run_dir / "results.json").read_text())["skipped_steps"] == skipped
    assert "updates skipped (not finite)" in (result.run_dir / "eval.txt").read_text()
    assert "2 of 6" in (result.run_dir / "eval.txt").read_text()


def test_more_skipped_steps_than_the_allowed_fraction_stop_the_run_with_a_checkpoint(tiny_overrides, tmp_path):
    """With the default train.max_skipped_fraction=0.1 of 6 steps, the first skipped update is one
    too many: the run stops in one line, after checkpointing the last step (its weights are sound:
    the bad update was not applied), and names the checkpoint to continue from."""
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as caught:
        kdlib.run(_cfg(tiny_overrides, f"algorithm.nan_samples=[{POISONED}]", "train.max_steps=6",
                       f"output_dir={run_dir}"))
    message = str(caught.value)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = rows[-1]["step"]
    assert "\n" not in message and rows[-1]["skipped"] == 1.0
    assert message.startswith(f"step {step}: 1 of the run's updates were skipped")
    assert "more than train.max_skipped_fraction=0.1 allows" in message
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    assert message.endswith(f"checkpoint {checkpoint} (continue with train.resume={run_dir})")
    assert (checkpoint / ".complete").exists()


def test_a_teacher_that_returns_nan_is_one_line_naming_it(tiny_llama, tiny_overrides, tmp_path):
    """A broken teacher (NaN weights) stops the run in the first evaluation, naming the teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan_teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(broken)
    overrides = [o for o in tiny_overrides if not o.startswith("teacher.model=")] + [f"teacher.model={broken}"]
    with pytest.raises(kdlib.KdlibError) as caught:
        kdlib.run(kdlib.compose(overrides))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"teacher {broken} returned hidden states that are not finite (NaN or inf)")
    assert "check the checkpoint, or try teacher.dtype=float32" in message


def test_too_many_bad_steps_in_a_row_stop_the_run_naming_step_and_samples(tiny_overrides, tmp_path):
    everything = ",".join(str(i) for i in range(24))
    cfg = _cfg(tiny_overrides, f"algorithm.nan_samples=[{everything}]", "train.max_bad_steps=2",
               "train.max_skipped_fraction=1", "train.max_steps=3", f"output_dir={tmp_path / 'run'}")
    with built(cfg, run_dir=None) as loop:
        batches = loop.sample_batches()
        next(batches)
        second = sorted(s.index for s in next(batches))
    with pytest.raises(TrainingError) as caught:
        kdlib.run(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("step 2: loss or gradients not finite (loss=nan")
    assert "for 2 steps in a row (train.max_bad_steps=2)" in message
    assert f"samples {second}" in message
    assert message.endswith(f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_2'} "
                            f"(continue with train.resume={tmp_path / 'run'})")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in rows] == [(1, 1.0, 1.0), (2, 1.0, 2.0)]


def test_max_bad_steps_must_be_positive(tiny_overrides):
    from kdlib.errors import ConfigError

    with pytest.raises(ConfigError, match="train.max_bad_steps must be positive, got 0"):
        kdlib.compose(tiny_overrides + ["train.max_bad_steps=0"])
