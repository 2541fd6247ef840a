"""The kdlib command: runs, sweeps, --cfg job, and one-line errors (subprocesses, as users run it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

KDLIB = [sys.executable, "-m", "kdlib"]


def _run(args, cwd, check=True, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    out = subprocess.run([*KDLIB, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"kdlib {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def _cli_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("output_dir=")]


def test_cli_run_writes_the_run_directory(tiny_overrides, tmp_path):
    """Also: with stderr not a terminal, every phase reports progress as log lines, and each line
    of kdlib.log is written once."""
    run_dir = tmp_path / "cli_run"
    args = _cli_overrides(tiny_overrides) + [f"hydra.run.dir={run_dir}", "logging.progress=true"]
    _run(args, cwd=tmp_path, env={"KDLIB_PROGRESS_SECONDS": "0.05"})
    assert (run_dir / "student" / "config.json").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "config.yaml").exists()

    lines = (run_dir / "kdlib.log").read_text().splitlines()
    duplicated = sorted({line for line in lines if lines.count(line) > 1})
    assert not duplicated, duplicated
    messages = [line.split(" - ", 1)[-1] for line in lines]
    for done in ("loading the teacher done: took", "loading the student done: took", "evaluating done: 1/1 batch",
                 "distilling done: 3/3 step", "saving the student done: took"):
        assert any(m.startswith(done) for m in messages), done
    assert sum(m.startswith("evaluating done:") for m in messages) == 2  # before and after training


def test_a_failed_sweep_job_does_not_stop_the_sweep(tiny_overrides, tmp_path):
    """A job whose model cannot be loaded fails in one line; the others run; the table says why the
    failed one failed; the command exits 2 at the end."""
    sweep_dir = tmp_path / "sweep"
    args = [o for o in _cli_overrides(tiny_overrides) if not o.startswith("student.model=")]
    good = next(o for o in tiny_overrides if o.startswith("student.model=")).split("=", 1)[1]
    out = _run(["-m", f"student.model={good},{tmp_path / 'no_such_model'}", f"hydra.sweep.dir={sweep_dir}",
                "train.max_steps=1", "eval.before=false", *args], cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("kdlib: error: 1 sweep job(s) failed (1_student.model="
                                                  f"{str(tmp_path / 'no_such_model').replace('/', '_')}); "
                                                  "the sweep's sweep_results.md says why")
    rows = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert [r["status"] for r in rows][0] == "done" and rows[1]["status"].startswith("failed: ")
    assert "no_such_model" in rows[1]["status"]


def test_a_sweep_ends_in_one_comparison(tiny_overrides, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = _cli_overrides(tiny_overrides) + ["train.max_steps=1", "eval.before=false"]
    out = _run(["-m", "loss=kl,rkl,jsd,tvd", f"hydra.sweep.dir={sweep_dir}", *args], cwd=tmp_path)
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert jobs == ["0_loss=kl", "1_loss=rkl", "2_loss=jsd", "3_loss=tvd"]
    names = {yaml.safe_load((sweep_dir / j / "config.yaml").read_text())["loss"]["name"] for j in jobs}
    assert names == {"kl", "rkl", "jsd", "tvd"}
    rows = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert [r["overrides"] for r in rows] == ["loss=kl", "loss=rkl", "loss=jsd", "loss=tvd"]
    for row in rows:
        result = json.loads((sweep_dir / row["job"] / "results.json").read_text())
        assert row["status"] == "done" and row["kl"] == result["eval_after"]["kl"]
        assert row["student"] is None  # a sweep's jobs do not save their students by default
    table = (sweep_dir / "sweep_results.md").read_text()
    assert table.count("not saved") == 4 and "loss=tvd" in table
    assert "sweep results" in out.stdout and (sweep_dir / "sweep_results.png").exists()


def test_cli_prints_composed_config(tmp_path):
    out = _run(["--cfg", "job", "+recipe=offpolicy", "loss=jsd", "loss.beta=0.3"], cwd=tmp_path)
    assert "beta: 0.3" in out.stdout and "name: jsd" in out.stdout and "kd_ratio: 0.5" in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["loss=nope"], "kdlib: error: unknown loss 'nope'; choose one of:"),
        (["train.max_steps=abc"], "kdlib: error: bad value for train.max_steps"),
        (["-m", "loss=kl,nope"], "unknown loss 'nope'"),
        (["data.train=/no/such/file.jsonl", "data.eval=null"], "kdlib: error: data.train: file not found: /no/such/file.jsonl"),
    ],
)
def test_cli_errors_are_one_line(args, expected, tmp_path):
    out = _run(args, cwd=tmp_path, check=False)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("kdlib: error:")]
    assert len(errors) == 1 and expected in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_generate_mode_writes_teacher_responses(tiny_llama, chat_data, tmp_path):
    run_dir = tmp_path / "gen"
    _run([
        "+recipe=generate", f"teacher.model={tiny_llama}", f"data.train={chat_data['eval']}",
        "rollout.max_new_tokens=6", "rollout.batch_size=3", "rollout.n_samples_per_prompt=2",
        "generate.drop_truncated=false", "device=cpu", "logging.progress=false", f"hydra.run.dir={run_dir}",
    ], cwd=tmp_path)
    rows = [json.loads(line) for line in (run_dir / "generated.jsonl").read_text().splitlines()]
    report = json.loads((run_dir / "generate_report.json").read_text())
    assert report["rows"] == 8
    assert report["written"] + report.get("dropped (empty response)", 0) == 16  # 8 prompts x 2 samples
    assert len(rows) == report["written"]
    for row in rows:
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-2]["role"] == "user"
        assert row["finish_reason"] in {"stop", "length"}
        assert "id" in row
    truncated = sum(r["finish_reason"] == "length" for r in rows)
    assert report.get("truncated by rollout.max_new_tokens", 0) >= truncated


def test_installed_wheel_finds_its_configs(tmp_path):
    """A non-editable install (pip install .) ships conf/ as kdlib.conf."""
    repo = Path(__file__).resolve().parents[2]
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(repo)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    code = (
        "import kdlib, kdlib.config.compose as c; "
        "print(c.conf_dir()); print(kdlib.compose(['+recipe=offpolicy', 'loss=rkl']).loss.name)"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, check=True)
    conf, loss = out.stdout.split()
    assert conf.startswith(str(target)) and loss == "rkl"
    assert (Path(conf) / "recipe" / "offpolicy.yaml").exists()


@pytest.mark.ray
def test_cli_ray_recipe_and_sweep_start_and_stop_ray(tiny_overrides, tmp_path):
    """+recipe=ray: the launcher starts Ray for each job of a sweep and shuts it down after."""
    sweep_dir = tmp_path / "ray_sweep"
    args = _cli_overrides(tiny_overrides) + ["+recipe=ray", "train.max_steps=2", "eval.before=false", "launcher.num_cpus=2",
                                          "save_student=true"]  # a sweep's jobs save only when asked
    out = _run(["-m", "loss=kl,rkl", f"hydra.sweep.dir={sweep_dir}", *args], cwd=tmp_path)
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "metrics.jsonl").exists())
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "student" / "model.safetensors").exists()
        assert len((job / "metrics.jsonl").read_text().splitlines()) == 2
    assert "Traceback" not in out.stderr


def test_user_loss_from_a_plugin_runs_through_the_fused_path(tiny_overrides, tmp_path):
    """kdlib plugins=[module] loss=name loss.param=...: the registered divergence is what trains."""
    (tmp_path / "my_kd_plugin.py").write_text(
        "import kdlib\n"
        "@kdlib.register_loss('half_kl_plugin')\n"
        "def half_kl(student_logits, teacher_logits, *, alpha: float = 0.5):\n"
        "    from kdlib.losses.divergences import forward_kl\n"
        "    return alpha * forward_kl(student_logits, teacher_logits)\n"
    )
    args = _cli_overrides(tiny_overrides) + ["train.max_steps=1", "eval.before=false", "save_student=false",
                                             "loss.implementation=fused", "algorithm.kd_ratio=1.0"]
    _run(args + [f"hydra.run.dir={tmp_path / 'kl'}", "loss=kl"], cwd=tmp_path)
    _run(args + [f"hydra.run.dir={tmp_path / 'user'}", "plugins=[my_kd_plugin]", "loss=half_kl_plugin", "loss.alpha=0.2"], cwd=tmp_path)
    kl = json.loads((tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()[0])
    user = json.loads((tmp_path / "user" / "metrics.jsonl").read_text().splitlines()[0])
    assert user["kd_loss"] == pytest.approx(0.2 * kl["kd_loss"], rel=1e-5)
    assert yaml.safe_load((tmp_path / "user" / "config.yaml").read_text())["loss"]["alpha"] == 0.2


def test_prune_search_sweeps_candidates_and_names_the_winner(tiny_overrides, tmp_path):
    """+recipe=prune_search is a sweep by itself (no -m); the command line narrows its grid to the
    tiny model's sizes. Each candidate is pruned to the same budget and judged by held-out KL."""
    sweep_dir = tmp_path / "search"
    args = [o for o in _cli_overrides(tiny_overrides) if not o.startswith(("student.num_layers", "train.max_steps"))]
    out = _run(["+recipe=prune_search", "student.prune.num_layers=2,3", "student.prune.depth=evenly,block_influence",
                "student.prune.params=150000", "student.prune.calibration_tokens=256", "student.prune.kl_tokens=128",
                "train.max_steps=2", f"hydra.sweep.dir={sweep_dir}", *args],
               cwd=tmp_path, env={"KDLIB_CACHE": str(tmp_path / "cache")})
    rows = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows), rows
    assert rows[0]["job"] == "0_student.prune.depth=evenly,student.prune.num_layers=2"
    assert all(r["params"] <= 150_000 for r in rows)
    assert len({r["kl_before"] for r in rows}) > 1  # the candidates start from different students
    best = min(rows, key=lambda r: r["kl"])
    table = (sweep_dir / "sweep_results.md").read_text()
    assert f"lowest held-out KL: job {best['job']}" in table and "KL before" in table
    command = table.strip().splitlines()[-1].strip()
    assert command.startswith("kdlib ") and "+recipe=prune_search" not in command
    assert f"student.prune.depth={best['overrides'].split('depth=')[1].split()[0]}" in command
    assert command in out.stdout
