"""Several teachers: the step time of routing, and the memory of teachers taking turns.

Runs the default job's models (the embedded SmolLM2-135M teacher, its pruned student, read from
the checkpoint the default job made) on the shipped training data, each configuration in a fresh
process, in this one invocation:

- ``single``: the one-teacher run;
- ``routed_one``: two teachers configured (``teacher`` and ``copy``, a second SmolLM2), every row
  routed to ``teacher`` (the routing machinery, one model loaded);
- ``routed_two``: rows alternately routed to ``teacher`` and ``copy``: the same total teacher
  tokens as ``single``, two teacher models in memory; micro-batches hold samples of both teachers
  (``routing.mix_micro_batches=true``, the default: one student forward, each teacher's loss on its
  rows);
- ``routed_two_apart``: as ``routed_two`` with each micro-batch one teacher's samples (more,
  smaller micro-batches; ``routing.mix_micro_batches=false``);
- ``routed_turns``: as ``routed_two`` with ``routing.take_turns=true`` (one teacher model loaded
  at a time, each loaded again for its turn).

and prints per configuration the summed ``step_seconds`` of steps 2..N (the first holds one-time
set-up; every configuration trains the same samples in the same steps, so the sum is the time of
the same work, whereas steps differ in size by 2x and the median picks whichever lands in the
middle), the median step, the teacher and student seconds, the teacher tokens per step (to check they are the same total), the micro-batches per
step, and the process's peak resident memory (``ru_maxrss``). The goals (issue 27): routed
two-teacher step time at most 1.05x ``single``; with turns, peak memory at most the largest teacher
plus the student plus 10%.

    python benchmarks/multi_teacher.py                     # 8 steps per configuration
    python benchmarks/multi_teacher.py --steps 12 --extra train.packing=false
    python benchmarks/multi_teacher.py --rounds 3 --only single routed_one routed_two_apart
    python benchmarks/multi_teacher.py --interleaved --steps 41 --only single routed_one routed_two
    python benchmarks/multi_teacher.py --interleaved --steps 41 --only single routed_two routed_two_unshared
    python benchmarks/multi_teacher.py --interleaved --profile --steps 13 --only single routed_two routed_two_unshared

On this 2-core machine two processes running the same job differ by up to ~20% in step time
(placement, allocation: teacher and student seconds move together within a process), more than
the 5% the goal allows; ``--rounds N`` runs every configuration N times in alternating order and
reports the median over the processes of each one's median step. ``--interleaved`` (the figures
that count for the 1.05x goal) builds every configuration in this one process and steps them in
turn on the same batches, printing the summed step time of steps 2..N against ``single`` with a 95%
bootstrap interval over steps; ``routed_one`` is its control (the same computation as ``single``),
and ``routed_two_unshared`` (interleaved only) is ``routed_two`` with the parts of a mixed
micro-batch not sharing their loss buffers, the A/B of ``kdlib.losses.shared_buffers``.
It measures time only: the peak memory of a process holding every configuration says nothing
about one.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext
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
# --interleaved only: routed_two with its parts' losses not sharing buffers (each allocating its own
# head gradient and workspace, as before kdlib.losses.shared_buffers): the A/B of that change.
UNSHARED = {"routed_two_unshared": CONFIGS["routed_two"]}

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
        "total_s": sum(r["step_seconds"] for r in later),
        "teacher_total_s": sum(r["teacher_seconds"] for r in later),
        "student_total_s": sum(r["student_seconds"] for r in later),
        "teacher_tokens": sum(teacher_tokens) / len(rows) if any(teacher_tokens) else None,
        "micro_batches": statistics.mean(r["micro_batches"] for r in rows),
        "peak_rss_gib": result["max_rss_kib"] / 2**20,
    }


def median_of(rounds: list[dict]) -> dict:
    """Each figure's median over the processes of one configuration (the token count of the first:
    every round reads the same samples)."""
    return {key: rounds[0][key] if key == "teacher_tokens" else statistics.median(r[key] for r in rounds)
            for key in rounds[0]}


def interleaved(names: list[str], common: list[str], steps: int, directory: Path, profile: bool = False) -> None:
    """Every configuration built in this one process and stepped in turn: step k of each, in an
    order that rotates with k, on the same global batch (each run's own seeded order, the same for
    all). A slow or fast stretch of the machine then falls on all of them alike; what a process's
    placement does, it does to all of them too. Prints per configuration the summed wall time of
    ``TrainingLoop.step`` over steps 2..N and its ratio to ``single``, and the median over steps
    of the per-step ratio. ``profile``: each configuration's steps 2..N also run under its own
    ``cProfile`` (which slows them: time figures are then not the ones to quote), and the functions
    whose time differs most from ``single``'s are printed (:func:`profile_differences`)."""
    import cProfile
    import time
    from contextlib import ExitStack

    import kdlib
    from kdlib.runner import built

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    teacher: dict[str, list[float]] = {name: [] for name in names}
    profiles = {name: cProfile.Profile() for name in names} if profile else {}
    with ExitStack() as stack:
        modes = {name: stack.enter_context(built(kdlib.compose(common + {**CONFIGS, **UNSHARED}[name]), directory / name))
                 for name in names}
        batches = {name: mode.sample_batches() for name, mode in modes.items()}
        for step in range(1, steps + 1):
            samples = {name: next(batches[name]) for name in names}
            order = names[step % len(names):] + names[:step % len(names)]
            for name in order:
                profiler = profiles.get(name) if step > 1 else None
                start = time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                with unshared() if name in UNSHARED else nullcontext():
                    metrics = modes[name].step(samples[name], step)
                if profiler is not None:
                    profiler.disable()
                seconds[name].append(time.perf_counter() - start)
                teacher[name].append(metrics["teacher_seconds"])
            print(f"step {step}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}" for n in names), flush=True)
    base = sum(seconds["single"][1:]) if "single" in seconds else None
    print(f"\n| configuration (one process, interleaved) | steps 2..{steps} (s) | vs single | 95% interval | "
          "per-step ratio, median | teacher (s) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        total = sum(seconds[name][1:])
        ratio = interval = per_step = ""
        if base:
            ratio = f"{total / base:.3f}x"
            low, high = paired_interval(seconds[name][1:], seconds["single"][1:])
            interval = f"{low:.3f}-{high:.3f}x"
            per_step = f"{statistics.median(a / b for a, b in zip(seconds[name][1:], seconds['single'][1:])):.3f}x"
        print(f"| {name} | {total:.1f} | {ratio} | {interval} | {per_step} | {sum(teacher[name][1:]):.1f} |")
    if profiles and "single" in profiles:
        profile_differences(profiles)


@contextmanager
def unshared():
    """The parts of a mixed micro-batch evaluated without sharing buffers, for the time of a step."""
    from kdlib.algorithms import routed

    original, routed.sharing = routed.sharing, nullcontext
    try:
        yield
    finally:
        routed.sharing = original


def profile_differences(profiles: dict, top: int = 12) -> None:
    """Per configuration other than ``single``, among the functions both ran over the profiled
    steps: those whose own time differs most from ``single``'s (where the extra time is spent),
    and the loss engine's functions (``kdlib/losses``) whose cumulative time differs most, with
    their counts of calls. (Functions only the routed run calls wrap the same work.)"""
    import pstats

    def by_function(profiler) -> dict[str, tuple[int, float, float]]:
        stats = pstats.Stats(profiler).stats
        return {f"{path.split('site-packages/')[-1].split('src/')[-1]}:{line}:{func}": (calls, own, cumulative)
                for (path, line, func), (_, calls, own, cumulative, _) in stats.items()}

    base = by_function(profiles["single"])
    for name, profiler in profiles.items():
        if name == "single":
            continue
        mine = by_function(profiler)
        both = set(mine) & set(base)
        for title, field, keys in (("own", 1, both), ("cumulative, loss engine", 2,
                                                       {k for k in both if k.startswith("kdlib/losses/")})):
            print(f"\n{name} against single, profiled steps ({title} seconds; calls):")
            for key in sorted(keys, key=lambda k: -abs(mine[k][field] - base[k][field]))[:top]:
                print(f"  {mine[key][field] - base[key][field]:+7.2f} s  {base[key][field]:7.2f} -> "
                      f"{mine[key][field]:7.2f}  calls {base[key][0]} -> {mine[key][0]}  {key}")


def paired_interval(times: list[float], base: list[float], draws: int = 4000) -> tuple[float, float]:
    """A 95% bootstrap interval of sum(times) / sum(base), resampling steps (pairs kept together:
    both ran step k's batch, next to each other)."""
    import random

    rng = random.Random(0)
    pairs = list(zip(times, base))
    ratios = sorted(
        sum(a for a, _ in sample) / sum(b for _, b in sample)
        for sample in ([rng.choice(pairs) for _ in pairs] for _ in range(draws))
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=list(CONFIGS), choices=[*CONFIGS, *UNSHARED])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every configuration")
    parser.add_argument("--rounds", type=int, default=1, help="processes per configuration, in alternating order")
    parser.add_argument("--profile", action="store_true",
                        help="with --interleaved: profile each configuration and print where it differs from single")
    parser.add_argument("--interleaved", action="store_true",
                        help="all configurations in this one process, stepped in turn (time only, no memory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdlib_multi_teacher_") as tmp:
        data = write_routed(Path(tmp))
        common = [f"train.max_steps={args.steps}", "eval.before=false", "data.eval=null", "logging.progress=false",
                  "save_student=false", "logging.plot=false", f"data.train={data}", *student(), *args.extra]
        if args.interleaved:
            return interleaved(args.only, common, args.steps, Path(tmp), args.profile)
        if set(args.only) & set(UNSHARED):
            parser.error(f"{', '.join(UNSHARED)} runs with --interleaved only")
        per_process: dict[str, list[dict]] = {name: [] for name in args.only}
        for round_ in range(args.rounds):
            for name in args.only if round_ % 2 == 0 else args.only[::-1]:
                # a directory per process: a run appends to the metrics.jsonl of its output_dir
                run_dir = Path(tmp) / f"{name}_{round_}"
                per_process[name].append(summary(run(common + CONFIGS[name] + [f"output_dir={run_dir}"])))
                print(name, json.dumps(per_process[name][-1]), flush=True)
    results = {name: median_of(rounds) for name, rounds in per_process.items()}
    if args.rounds > 1:
        for name, rounds in per_process.items():
            print(name, "steps 2..N per process (s):", " / ".join(f"{r['total_s']:.1f}" for r in rounds))
    base = results.get("single")
    print(f"\n| configuration | steps 2..{args.steps} (s) | vs single | step (s, median) | vs single | "
          "teacher (s) | student (s) | teacher tokens / step | micro-batches / step | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        total = f"{r['total_s'] / base['total_s']:.3f}x" if base else ""
        step = f"{r['step_s'] / base['step_s']:.3f}x" if base else ""
        tokens = "" if r["teacher_tokens"] is None else f"{r['teacher_tokens']:.0f}"
        print(f"| {name} | {r['total_s']:.1f} | {total} | {r['step_s']:.2f} | {step} | {r['teacher_total_s']:.1f} | "
              f"{r['student_total_s']:.1f} | {tokens} | {r['micro_batches']:.2f} | {r['peak_rss_gib']:.2f} |")
    if base and args.rounds > 1:
        print("\nper round, steps 2..N against the same round's single (the processes next to each other):")
        for name, rounds in per_process.items():
            if name != "single":
                ratios = [r["total_s"] / b["total_s"] for r, b in zip(rounds, per_process["single"])]
                print(f"  {name}: " + " / ".join(f"{x:.3f}" for x in ratios) +
                      f"  (median {statistics.median(ratios):.3f}x)")


if __name__ == "__main__":
    main()
