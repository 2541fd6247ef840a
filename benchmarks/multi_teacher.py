"""Several teachers: the step time of routing, and the memory of teachers taking turns.

Runs the default job's models (the embedded SmolLM2-135M teacher, its pruned student, read from
the checkpoint the default job made) on the shipped training data, each configuration in a fresh
process, in this one invocation:

- ``single``: the one-teacher run;
- ``routed_one``: two teachers configured (``teacher`` and ``copy``, a second SmolLM2), every row
  routed to ``teacher`` (the routing machinery, one model loaded);
- ``routed_two``: rows alternately routed to ``teacher`` and ``copy``: the same total teacher
  tokens as ``single``, two teacher models in memory; micro-batches hold samples of both teachers
  (``routing.mix_micro_batches=true``: one student forward, each teacher's loss on its rows);
- ``routed_two_apart``: as ``routed_two`` with each micro-batch one teacher's samples (more,
  smaller micro-batches; ``routing.mix_micro_batches=false``, the default);
- ``routed_turns``: as ``routed_two_apart`` with ``routing.take_turns=true`` (one teacher model loaded
  at a time, each loaded again for its turn).

and prints per configuration the median ``step_seconds`` of steps 2..N (the first holds one-time
set-up), the teacher tokens per step (to check they are the same total), the micro-batches per
step, and the process's peak resident memory (``ru_maxrss``). The goals (issue 27): routed
two-teacher step time at most 1.05x ``single``; with turns, peak memory at most the largest teacher
plus the student plus 10%.

    python benchmarks/multi_teacher.py                     # 8 steps per configuration
    python benchmarks/multi_teacher.py --steps 12 --extra train.packing=false
    python benchmarks/multi_teacher.py --rounds 3 --only single routed_one routed_two_apart

On this 2-core machine two processes running the same job differ by up to ~20% in step time
(placement, allocation: teacher and student seconds move together within a process), more than
the 5% the goal allows; ``--rounds N`` runs every configuration N times in alternating order and
reports the median over the processes of each one's median step.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Every configuration reads the same file (the student is pruned once per data, see student.prune).
CONFIGS = {
    "single": [],
    "routed_one": ["routing.key=expert_one", "+teacher@teachers.copy=smollm2"],
    "routed_two": ["routing.key=expert_two", "+teacher@teachers.copy=smollm2", "routing.mix_micro_batches=true"],
    "routed_two_apart": ["routing.key=expert_two", "+teacher@teachers.copy=smollm2", "routing.mix_micro_batches=false"],
    "routed_turns": ["routing.key=expert_two", "+teacher@teachers.copy=smollm2", "routing.take_turns=true"],
}

CHILD = """
import json, resource, sys
import kdlib
result = kdlib.run(kdlib.compose(json.loads(sys.argv[1])))
print("RESULT", json.dumps({"run_dir": str(result.run_dir),
                            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_routed(directory: Path) -> Path:
    """The shipped training rows with two route columns: ``expert_one`` (every row ``teacher``) and
    ``expert_two`` (``teacher`` and ``copy`` alternately)."""
    source = importlib.resources.files("kdlib") / "data" / "builtin" / "smol_instruct_train.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = directory / "train_routed.jsonl"
    path.write_text("".join(
        json.dumps({**row, "expert_one": "teacher", "expert_two": "teacher" if i % 2 == 0 else "copy"}) + "\n"
        for i, row in enumerate(rows)
    ))
    return path


def student() -> list[str]:
    """The default job's pruned student, as a checkpoint: pruning is keyed on the data file, so
    the routed copies of the data would otherwise prune (minutes) once per temporary directory."""
    import kdlib
    from kdlib.runner import resolved

    pruned = resolved(kdlib.compose(["logging.progress=false"])).student.prune.output
    if not pruned or not (Path(pruned) / "model.safetensors").exists():
        raise SystemExit("run the default job once first (`kdlib +recipe=quickstart`): it makes the pruned student")
    return [f"student.model={pruned}"]


def run(overrides: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], check=True, env=env,
                          capture_output=True, text=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def summary(result: dict) -> dict:
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    teacher_tokens = [sum(v for k, v in r.items() if k.startswith("teacher/") and k.endswith("/tokens")) for r in rows]
    return {
        "step_s": statistics.median(r["step_seconds"] for r in later),
        "teacher_s": statistics.median(r["teacher_seconds"] for r in later),
        "teacher_tokens": sum(teacher_tokens) / len(rows) if any(teacher_tokens) else None,
        "micro_batches": statistics.mean(r["micro_batches"] for r in rows),
        "peak_rss_gib": result["max_rss_kib"] / 2**20,
    }


def median_of(rounds: list[dict]) -> dict:
    """Each figure's median over the processes of one configuration (the token count of the first:
    every round reads the same samples)."""
    return {key: rounds[0][key] if key == "teacher_tokens" else statistics.median(r[key] for r in rounds)
            for key in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every configuration")
    parser.add_argument("--rounds", type=int, default=1, help="processes per configuration, in alternating order")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdlib_multi_teacher_") as tmp:
        data = write_routed(Path(tmp))
        common = [f"train.max_steps={args.steps}", "eval.before=false", "data.eval=null", "logging.progress=false",
                  "save_student=false", "logging.plot=false", f"data.train={data}", *student(), *args.extra]
        per_process: dict[str, list[dict]] = {name: [] for name in args.only}
        for round_ in range(args.rounds):
            for name in args.only if round_ % 2 == 0 else args.only[::-1]:
                per_process[name].append(summary(run(common + CONFIGS[name] + [f"output_dir={Path(tmp) / name}"])))
                print(name, json.dumps(per_process[name][-1]), flush=True)
    results = {name: median_of(rounds) for name, rounds in per_process.items()}
    if args.rounds > 1:
        for name, rounds in per_process.items():
            print(name, "step per process:", " / ".join(f"{r['step_s']:.2f}" for r in rounds))
    base = results.get("single")
    print(f"\n| configuration | step (s, median of steps 2..{args.steps}) | vs single | teacher (s) | "
          "teacher tokens / step | micro-batches / step | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['step_s'] / base['step_s']:.3f}x" if base else ""
        tokens = "" if r["teacher_tokens"] is None else f"{r['teacher_tokens']:.0f}"
        print(f"| {name} | {r['step_s']:.2f} | {ratio} | {r['teacher_s']:.2f} | {tokens} | "
              f"{r['micro_batches']:.2f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
