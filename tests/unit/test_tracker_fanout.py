"""The tracker fan-out: a failing tracker dropped (never the run), sweep names, log directories
(composition checks of the options: test_composition_checks.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from kdlib.tracking.trackers import RunIdentity, Tracker, Trackers, identity_from_hydra


class Recorder(Tracker):
    """A tracker that keeps what it gets (and can be told to fail in one method)."""

    def __init__(self, fail_in: str = "") -> None:
        self.calls: list[tuple] = []
        self.fail_in = fail_in
        self.finished = None

    def _record(self, method: str, *args) -> None:
        if method == self.fail_in:
            raise RuntimeError(f"{method} broke\nsecond line")
        self.calls.append((method, *args))

    def log_metrics(self, row, step):
        self._record("log_metrics", row, step)

    def log_table(self, key, columns, rows, step):
        self._record("log_table", key, columns, rows, step)

    def log_image(self, key, path, step):
        self._record("log_image", key, path, step)

    def log_summary(self, values):
        self._record("log_summary", values)

    def finish(self, failed):
        self.finished = failed


def test_metrics_eval_and_samples_fan_out_to_every_tracker():
    a, b = Recorder(), Recorder()
    trackers = Trackers([a, b])
    trackers.log_metrics({"step": 3, "loss": 1.5, "lr": 1e-3, "note": "text is not a scalar"})
    trackers.log_eval({"kl": 0.5, "ce": 2.0}, step=0)
    trackers.log_eval_table({"kl": 0.5}, {"kl": 0.25}, step=3)
    trackers.log_samples([{"step": 3, "prompt": [{"role": "user", "content": "hi"}], "response": "yo",
                           "response_tokens": 2, "finish_reason": "stop"}], step=3)
    with trackers:
        pass
    for tracker in (a, b):
        assert tracker.calls[0] == ("log_metrics", {"loss": 1.5, "lr": 1e-3}, 3)
        assert tracker.calls[1] == ("log_metrics", {"eval/kl": 0.5, "eval/ce": 2.0}, 0)
        assert tracker.calls[2] == ("log_table", "eval/table", ["metric", "before", "after", "change"], [["kl", 0.5, 0.25, -0.25]], 3)
        assert tracker.calls[3] == ("log_summary", {"eval/after/kl": 0.25, "eval/before/kl": 0.5})
        assert tracker.calls[4][:2] == ("log_table", "rollouts") and tracker.calls[4][3] == [[3, "hi", "yo", 2, "stop"]]
        assert tracker.finished is False


def test_a_tracker_failing_mid_run_is_dropped_and_the_others_go_on(caplog):
    broken, healthy = Recorder(fail_in="log_metrics"), Recorder()
    trackers = Trackers([broken, healthy])
    with caplog.at_level(logging.WARNING, logger="kdlib.tracking.trackers"):
        trackers.log_metrics({"step": 1, "loss": 2.0})
        trackers.log_metrics({"step": 2, "loss": 1.0})
    assert [c[2] for c in healthy.calls] == [1, 2] and broken.calls == []
    assert trackers.trackers == [healthy]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["tracker Recorder failed in log_metrics (log_metrics broke); it gets nothing more from this run"]


def _hydra_cfg(tmp_path: Path, mode: str, task: list[str], num: int = 0, override_dirname: str = "") -> object:
    from hydra.types import RunMode

    return OmegaConf.create({
        "mode": RunMode[mode], "runtime": {"output_dir": str(tmp_path / "out" / str(num))},
        "sweep": {"dir": str(tmp_path / "sweep")}, "overrides": {"task": task},
        "job": {"num": num, "override_dirname": override_dirname},
    })


def test_sweep_jobs_are_named_by_the_overrides_the_sweep_varies(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml(
        {"hydra": {"overrides": {"task": ["loss=kl,rkl", "train.lr=1e-3", "+recipe=quickstart", "seed=range(1,3)"]}}}
    ))
    job = _hydra_cfg(tmp_path, "MULTIRUN", ["loss=rkl", "train.lr=1e-3", "+recipe=quickstart", "seed=2"], num=3)
    assert identity_from_hydra(job) == RunIdentity(name="loss=rkl,seed=2", sweep_dir=str(sweep), job_num=3)
    assert identity_from_hydra(job).group == str(sweep)
    single = _hydra_cfg(tmp_path, "RUN", ["loss=kl"])
    assert identity_from_hydra(single) == RunIdentity(name="0")
    (sweep / "multirun.yaml").unlink()  # another launcher: Hydra's override_dirname
    assert identity_from_hydra(_hydra_cfg(tmp_path, "MULTIRUN", ["loss=kl"], num=1, override_dirname="loss=kl")).name == "loss=kl"


def test_tensorboard_log_dir_of_single_runs_and_sweep_jobs(tmp_path):
    from kdlib.tracking.tensorboard_tracker import log_dir

    assert log_dir(tmp_path / "run", RunIdentity(name="run")) == tmp_path / "run" / "tensorboard"
    job = RunIdentity(name="data.train=/a/b.jsonl,loss=kl", sweep_dir=str(tmp_path / "sweep"), job_num=4)
    assert log_dir(tmp_path / "sweep" / "4", job) == tmp_path / "sweep" / "tensorboard" / "4-data.train=_a_b.jsonl,loss=kl"
