"""metrics.jsonl holds one run: a fresh run sets an earlier run's rows aside, a resumed run keeps
its own rows up to the checkpoint."""

import json

from kdlib.tracking.records import MetricsWriter


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_run(run_dir, steps, loss, resumed_at=0):
    writer = MetricsWriter(run_dir, resumed_at=resumed_at)
    for step in steps:
        writer.write({"step": step, "loss": loss + step})
    writer.close()
    return writer


def test_a_fresh_run_in_a_used_directory_sets_the_earlier_metrics_aside(tmp_path):
    write_run(tmp_path, [1, 2, 3], loss=10.0)
    write_run(tmp_path, [1, 2], loss=20.0)
    assert [r["loss"] for r in rows_of(tmp_path / "metrics.jsonl")] == [21.0, 22.0]
    assert [r["loss"] for r in rows_of(tmp_path / "metrics.jsonl.1")] == [11.0, 12.0, 13.0]
    write_run(tmp_path, [1], loss=30.0)
    assert [r["loss"] for r in rows_of(tmp_path / "metrics.jsonl.2")] == [21.0, 22.0]
    assert [r["loss"] for r in rows_of(tmp_path / "metrics.jsonl")] == [31.0]


def test_a_resumed_run_keeps_its_rows_up_to_the_checkpoint_in_the_same_file(tmp_path):
    write_run(tmp_path, [1, 2, 3], loss=10.0)
    writer = write_run(tmp_path, [3, 4], loss=40.0, resumed_at=2)
    assert [(r["step"], r["loss"]) for r in rows_of(tmp_path / "metrics.jsonl")] == [(1, 11.0), (2, 12.0), (3, 43.0), (4, 44.0)]
    assert [r["step"] for r in writer.rows] == [1, 2, 3, 4]
    assert not (tmp_path / "metrics.jsonl.1").exists()
