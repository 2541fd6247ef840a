"""W&B (offline) and TensorBoard get exactly what the run directory holds; sweeps are grouped; a
tracker that cannot start stops the run before any model loads; no tracker is imported unchosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

import kdlib
from kdlib.errors import ConfigError
from kdlib.demo.text import chat_rows, write_jsonl

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")

from tracker_readback import read_tensorboard, read_wandb_run, wandb_run_dirs  # noqa: E402

TRACKERS = ["logging.trackers=[wandb,tensorboard]"]


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _config_without_wandb(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "_wandb"}


def test_trackers_get_every_metric_the_config_the_eval_and_the_plot(wandb_offline, tiny_overrides, tmp_path):
    cfg = kdlib.compose(tiny_overrides + TRACKERS + ["eval.every_steps=2", f"output_dir={tmp_path / 'run'}"])
    result = kdlib.run(cfg)
    rows = _rows(result.run_dir)
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    evals = {0: evaluation["before"], 2: evaluation["during"][0], 3: evaluation["after"]}
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert len(rows) == 3

    tensorboard = read_tensorboard(result.run_dir / "tensorboard")
    scalars = tensorboard["scalars"]
    for row in rows:
        for key, value in row.items():
            if key != "step":  # TensorBoard keeps float32
                assert scalars[key][row["step"]] == np.float32(value), (key, row["step"])
    for step, metrics in evals.items():
        for key in ("kl", "ce", "top1_agreement"):
            assert scalars[f"eval/{key}"][step] == np.float32(metrics[key]), (key, step)
    assert set(scalars) == {k for k in rows[0] if k != "step"} | {f"eval/{k}" for k in evals[3] if k != "step"}
    config_text = tensorboard["texts"]["config"][0]
    assert yaml.safe_load(config_text.removeprefix("```yaml\n").removesuffix("```")) == config
    table = tensorboard["texts"]["eval/table"][3]
    assert f"| kl | {evals[0]['kl']:.6g} | {evals[3]['kl']:.6g} |" in table
    assert tensorboard["images"] == ["plots/loss"]

    (run_path,) = wandb_run_dirs(result.run_dir)
    run = read_wandb_run(run_path)
    assert run.name == result.run_dir.name and run.group == ""
    assert _config_without_wandb(run.config) == config
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert run.history[row["step"]][key] == value, (key, row["step"])
    for step, metrics in evals.items():
        assert run.history[step]["eval/kl"] == metrics["kl"]
    assert run.summary["eval/after/kl"] == evals[3]["kl"] and run.summary["eval/before/ce"] == evals[0]["ce"]
    names = [p.relative_to(run_path / "files").as_posix() for p in run.files]
    assert any(n.startswith("media/images/plots/loss_3_") and n.endswith(".png") for n in names)
    (table_file,) = [p for p in run.files if p.name.startswith("table_3_") and p.name.endswith(".table.json")]
    saved = json.loads(table_file.read_text())
    assert saved["columns"] == ["metric", "before", "after", "change"]
    assert saved["data"][0][:3] == ["kl", evals[0]["kl"], evals[3]["kl"]]


def test_onpolicy_rollout_samples_reach_both_trackers(wandb_offline, tiny_overrides, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(4, seed=7))
    cfg = kdlib.compose(tiny_overrides + TRACKERS + [
        "+recipe=onpolicy", f"data.train={prompts}", "train.global_batch_size=4", "train.max_steps=2",
        "rollout.max_new_tokens=6", "logging.tracker_samples=2", "eval.before=false", "save_student=false",
        f"output_dir={tmp_path / 'run'}",
    ])
    result = kdlib.run(cfg)
    rollouts = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    expected = {step: [r for r in rollouts if r["step"] == step][:2] for step in (1, 2)}

    texts = read_tensorboard(result.run_dir / "tensorboard")["texts"]["rollouts"]
    assert sorted(texts) == [1, 2]
    for step, rows in expected.items():
        lines = texts[step].splitlines()
        assert lines[0] == "| step | prompt | response | response_tokens | finish_reason |" and len(lines) == 2 + 2
        for line, row in zip(lines[2:], rows, strict=True):
            assert f"| {row['response_tokens']} | {row['finish_reason']} |" in line

    (run_path,) = wandb_run_dirs(result.run_dir)
    tables = sorted(p for p in read_wandb_run(run_path).files if p.name.startswith("rollouts_"))
    assert len(tables) == 2
    for table, step in zip(tables, (1, 2)):
        data = json.loads(table.read_text())["data"]
        assert [[d[0], d[2], d[3], d[4]] for d in data] == [
            [step, r["response"], r["response_tokens"], r["finish_reason"]] for r in expected[step]
        ]


def test_a_sweep_is_one_view_named_by_its_swept_overrides(tiny_overrides, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [o for o in tiny_overrides if not o.startswith("output_dir=")] + TRACKERS + [
        "train.max_steps=2", "eval.before=false", "save_student=false", "logging.plot=false",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", WANDB_SILENT="true")
    out = subprocess.run([sys.executable, "-m", "kdlib", "-m", "loss=kl,rkl", f"hydra.sweep.dir={sweep_dir}", *args],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    views = sorted(p.name for p in (sweep_dir / "tensorboard").iterdir())
    assert views == ["0-loss=kl", "1-loss=rkl"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name[0].isdigit()) == ["0_loss=kl", "1_loss=rkl"]
    for num, loss in enumerate(("kl", "rkl")):
        rows = _rows(sweep_dir / f"{num}_loss={loss}")
        scalars = read_tensorboard(sweep_dir / "tensorboard" / views[num])["scalars"]
        assert [scalars["loss"][r["step"]] for r in rows] == [np.float32(r["loss"]) for r in rows]
        (run_path,) = wandb_run_dirs(sweep_dir / f"{num}_loss={loss}")
        run = read_wandb_run(run_path)
        assert run.name == f"loss={loss}" and run.group == str(sweep_dir)
        assert run.config["loss"]["name"] == loss
        assert [run.history[r["step"]]["loss"] for r in rows] == [r["loss"] for r in rows]


def test_a_tracker_that_cannot_start_stops_the_run_before_any_model_loads(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("a file where the event directory should go")
    # (no student.num_layers: resolving it reads the student's config.json, itself a one-line error)
    overrides = [o for o in tiny_overrides if not o.startswith("student.num_layers")]
    cfg = kdlib.compose(overrides + [
        "logging.trackers=[tensorboard]", "teacher.model=/no/such/teacher", "student.model=/no/such/student",
        f"output_dir={run_dir}",
    ])
    with pytest.raises(ConfigError) as failure:  # not the ModelError loading would raise
        kdlib.run(cfg)
    message = str(failure.value)
    assert message.startswith("logging.trackers: tensorboard failed to start: ") and "\n" not in message


def test_no_tracker_is_imported_unless_chosen(tiny_overrides, tmp_path):
    # (peft is not checked: transformers itself imports it when installed, to look for adapters)
    overrides = tiny_overrides + ["train.max_steps=1", "eval.before=false", f"output_dir={tmp_path / 'run'}"]
    code = (
        "import sys, kdlib\n"
        f"kdlib.run(kdlib.compose({overrides!r}))\n"
        "print(sorted(m for m in ('wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
