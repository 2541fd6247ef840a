"""Several teachers in one run (docs/multi_teacher.md): routing by a data column, ensembles.

The exactness goal: a run whose every sample routes to teacher A, and an ensemble whose weights put
everything on A, train bit for bit as the one-teacher run with A (same losses, same final weights).
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import kdlib
from kdlib.demo.text import chat_rows, write_jsonl


def routed_rows(n: int, seed: int, route) -> list[dict]:
    """``n`` chats, row i carrying ``expert=route(i)`` (left out where route gives None)."""
    rows = chat_rows(n, seed=seed)
    for i, row in enumerate(rows):
        value = route(i)
        if value is not None:
            row["expert"] = value
    return rows


@pytest.fixture
def routed_data(tmp_path):
    def make(route, n_train: int = 24, n_eval: int = 8) -> list[str]:
        train = write_jsonl(tmp_path / "routed" / "train.jsonl", routed_rows(n_train, 0, route))
        held = write_jsonl(tmp_path / "routed" / "eval.jsonl", routed_rows(n_eval, 1, route))
        return [f"data.train={train}", f"data.eval={held}"]

    return make


def named(name: str, model, *extra: str) -> list[str]:
    """Overrides adding teacher ``name`` (a whole teacher config from the teacher group)."""
    return [f"+teacher@teachers.{name}=smollm2", f"teachers.{name}.model={model}", f"teachers.{name}.dtype=float32",
            *extra]


def losses(result) -> list[float]:
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def same_run(a, b) -> None:
    assert losses(a) == losses(b)
    wa, wb = load_file(a.student_dir / "model.safetensors"), load_file(b.student_dir / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].equal(wb[key]), key


def test_every_sample_routed_to_one_teacher_is_the_one_teacher_run(tiny_overrides, tiny_llama, tiny_qwen3,
                                                                  routed_data, tmp_path):
    data = routed_data(lambda i: "coder")
    common = tiny_overrides + data + ["train.max_steps=2", "eval.before=false"]
    single = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'single'}"]))
    routed = kdlib.run(kdlib.compose(common + [
        f"output_dir={tmp_path / 'routed'}", f"teacher.model={tiny_qwen3}", "routing.key=expert",
        *named("coder", tiny_llama),
    ]))
    same_run(single, routed)
    assert {k: routed.eval_after[k] for k in single.eval_after} == single.eval_after
    assert routed.eval_after["teacher/coder/kl"] == single.eval_after["kl"]


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_an_ensemble_weighing_one_teacher_is_that_teacher_run(combine, tiny_overrides, tiny_llama, tiny_qwen3,
                                                              routed_data, tmp_path):
    data = routed_data(lambda i: None)
    common = tiny_overrides + data + ["train.max_steps=2", "eval.before=false"]
    single = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'single'}"]))
    ensemble = kdlib.run(kdlib.compose(common + [
        f"output_dir={tmp_path / 'ensemble'}", *named("other", tiny_qwen3),
        f"+ensemble@routing.ensembles.both={combine}", "routing.ensembles.both.members=[teacher,other]",
        "routing.ensembles.both.weights=[1,0]", "routing.default=both",
    ]))
    same_run(single, ensemble)


def test_a_mixed_run_reports_each_teacher(tiny_overrides, tiny_qwen3, routed_data, tmp_path):
    data = routed_data(lambda i: "coder" if i % 3 == 0 else None)
    result = kdlib.run(kdlib.compose(tiny_overrides + data + [
        "routing.key=expert", *named("coder", tiny_qwen3), "train.max_steps=2",
    ]))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["routed/coder/samples"] + row["routed/teacher/samples"] == 8
        assert row["routed/coder/loss_tokens"] + row["routed/teacher/loss_tokens"] > 0
        assert row["teacher/coder/tokens"] > 0 and row["teacher/teacher/tokens"] > 0
    for name in ("teacher", "coder"):
        assert result.eval_after[f"teacher/{name}/kl"] > 0
    table = (result.run_dir / "eval.txt").read_text()
    assert "per teacher" in table and "coder" in table
