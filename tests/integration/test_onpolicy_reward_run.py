"""On-policy runs with a reward (tiny models): the reward objective with reward_weight 0 is today's
on-policy KD bit for bit, a resumed run scores and trains as the uninterrupted one, Ray equals
local, and a failing reward function stops the run naming the sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdlib
from kdlib.demo.text import chat_rows, write_jsonl
from kdlib.errors import RewardError

# A reward the tiny random students' samples spread over: fewer sampled tokens score higher.
LENGTH = ["reward=length", "reward.target_tokens=2", "reward.coef=0.25"]


def _overrides(tiny_overrides, tmp_path, extra=()):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(8, seed=7))
    return tiny_overrides + [
        "+recipe=onpolicy", "loss=rkl", f"data.train={prompts}", "data.eval=null", "train.global_batch_size=4",
        "train.micro_batch_size=2", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8",
        "rollout.temperature=1.0", "train.warmup_ratio=0", "train.lr=3e-3", *extra,
    ]


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def _student(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(result.student_dir / "model.safetensors")


def test_reward_weight_zero_reproduces_onpolicy_kd_bit_for_bit(tiny_overrides, tmp_path):
    today = kdlib.run(kdlib.compose(_overrides(tiny_overrides, tmp_path, [f"output_dir={tmp_path / 'vanilla'}"])))
    zero = kdlib.run(kdlib.compose(_overrides(tiny_overrides, tmp_path, [
        "algorithm=reward_kd", "algorithm.kd_ratio=1", "algorithm.reward_weight=0", *LENGTH,
        f"output_dir={tmp_path / 'zero'}"])))
    weighted = kdlib.run(kdlib.compose(_overrides(tiny_overrides, tmp_path, [
        "algorithm=reward_kd", "algorithm.kd_ratio=1", "algorithm.reward_weight=1", *LENGTH,
        f"output_dir={tmp_path / 'weighted'}"])))
    a, b, c = _rows(today.run_dir), _rows(zero.run_dir), _rows(weighted.run_dir)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert y[key] == x[key], (x["step"], key)
        assert y["pg_loss"] == 0.0 and "reward_mean" in y and "pg_loss" not in x
    s0, s1 = _student(today), _student(zero)
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    # the same run with the reward weighted does differ: the comparison above could fail
    assert any(r["pg_loss"] != 0.0 for r in c) and c[-1]["loss"] != a[-1]["loss"]
    assert any(r["reward_group_std"] > 0 for r in c)
    assert weighted.outputs["reward_plot"].is_file() and "reward_plot" not in today.outputs
    rollouts = _rows(weighted.run_dir, "rollouts.jsonl")
    assert all("reward" in r and "advantage" in r for r in rollouts)
    for r in rollouts:
        assert r["reward"] == -0.25 * max(0, r["response_tokens"] - 2)


def test_resumed_reward_run_scores_and_trains_as_the_uninterrupted_one(tiny_overrides, tmp_path):
    """Rewards are stateless: a resumed run logs the uninterrupted run's rewards and advantages."""
    overrides = _overrides(tiny_overrides, tmp_path, [
        "algorithm=opd", "algorithm.reward_weight=0.5", *LENGTH, "train.max_steps=4", "train.checkpoint_every=2",
        "train.keep_checkpoints=3"])
    full = kdlib.run(kdlib.compose(overrides + [f"output_dir={tmp_path / 'full'}"]))
    checkpoint = full.run_dir / "checkpoints" / "step_2"
    resumed = kdlib.run(kdlib.compose(overrides + [f"train.resume={checkpoint}", f"output_dir={tmp_path / 'resumed'}"]))
    expected = [r for r in _rows(full.run_dir) if r["step"] > 2]
    got = _rows(resumed.run_dir)
    assert [r["step"] for r in got] == [3, 4] == [r["step"] for r in expected]
    for a, b in zip(expected, got, strict=True):
        for key in ("loss", "kd_loss", "pg_loss", "grad_norm", "reward_mean", "reward_group_std"):
            assert b[key] == a[key], (b["step"], key)

    def scored(run_dir: Path) -> list[tuple]:
        return [(r["step"], r["index"], r["response"], r["reward"], r["advantage"])
                for r in _rows(run_dir, "rollouts.jsonl") if r["step"] > 2]

    assert scored(resumed.run_dir) == scored(full.run_dir) and scored(full.run_dir)
    s0, s1 = _student(full), _student(resumed)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_a_raising_reward_function_stops_the_run_naming_the_sample(tiny_overrides, tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text(
        "def score(prompt, response, row):\n"
        "    if row['id'] == 5:\n        raise ZeroDivisionError('division by zero')\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = kdlib.compose(_overrides(tiny_overrides, tmp_path, [
        "algorithm=reward_kd", "reward=python", "reward.fn=bad_reward:score", "data.shuffle=false",
        f"output_dir={tmp_path / 'bad'}"]))
    with pytest.raises(RewardError, match=r"^reward=python \(fn=bad_reward:score\) raised ZeroDivisionError: "
                                          r"division by zero \(rollout of data.train row 6\)$"):
        kdlib.run(cfg)


@pytest.mark.ray
def test_ray_reward_run_matches_local(tiny_overrides, tmp_path):
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    extra = ["algorithm=reward_kd", *LENGTH]
    local = kdlib.run(kdlib.compose(_overrides(tiny_overrides, tmp_path, [*extra, f"output_dir={tmp_path / 'local'}"])))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        on_ray = kdlib.run(kdlib.compose(_overrides(tiny_overrides, tmp_path, [
            *extra, "launcher=ray", "transport=ray", "student.num_workers=2", f"output_dir={tmp_path / 'ray'}"])))
    finally:
        ray.shutdown()
    a, b = _rows(local.run_dir), _rows(on_ray.run_dir)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert y["reward_mean"] == x["reward_mean"]
        for key in ("loss", "kd_loss", "pg_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)


def test_importance_weights_use_the_engines_log_probabilities(tiny_overrides, tmp_path):
    """With is_clip the PG weights take the rollout engine's log-probabilities of the samples: the
    engines report them (rollout_k3 is logged) and the run trains on them; a cap below every ratio
    (1e-6) scales the term down by it, so the PG term changes as the formula says."""
    extra = ["algorithm=reward_kd", "algorithm.kd_ratio=1", *LENGTH, "train.max_steps=1"]
    plain = kdlib.run(kdlib.compose(_overrides(tiny_overrides, tmp_path, [*extra, f"output_dir={tmp_path / 'p'}"])))
    capped = kdlib.run(kdlib.compose(_overrides(tiny_overrides, tmp_path, [
        *extra, "algorithm.is_clip=1e-6", f"output_dir={tmp_path / 'c'}"])))
    a, b = _rows(plain.run_dir)[0], _rows(capped.run_dir)[0]
    assert "rollout_k3" in b and b["reward_mean"] == a["reward_mean"] and a["pg_loss"] != 0.0
    # the engine and trainer agree (k3 ~ 0), so every ratio is ~1 and min(ratio, 1e-6) = 1e-6
    assert b["pg_loss"] == pytest.approx(a["pg_loss"] * 1e-6, rel=1e-3)
