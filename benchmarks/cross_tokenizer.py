"""Cross-tokenizer distillation on the embedded models: step time against the same-tokenizer step,
and held-out bits per byte of each method at equal steps.

Teacher: SmolLM2-135M-Instruct (49,152 tokens). Student: its 16-layer depth-pruned copy, either
with the teacher's own tokenizer (the same-tokenizer baseline, vanilla KD) or with kdlib's 4,096-token
demo tokenizer and a transferred vocabulary (``+recipe=cross_tokenizer``).

``--part step`` builds each configuration's pipeline and runs a few optimizer steps on the same
global batches one by one, timing each step's wall clock and this process's CPU time (all threads:
with the local launcher teacher and student run here; on a machine shared with other work CPU time
moves far less with the load than wall time), and prints the means after the first (warm-up) step,
the per-step share of the alignment, which runs once when the data is loaded (measured separately:
the data side with and without the teacher's encoding and the aligner, per sample, times the
samples of a step), and the ratio to the same-tokenizer step.
``--part quality`` runs ``+recipe=cross_tokenizer`` with ``overlap``, ``uld``, ``gold``, ``dskd``
and CE only (``sft``) for the same number of steps and prints held-out bits per byte before (one
evaluation: every run starts from the same student) and after (student and teacher), top-1
agreement at 1:1 groups, seconds per step and the wall time of each run (wall includes one
evaluation for every run and the one before training for the first).

``--methods`` picks the methods of either part (the step part always runs its baseline).
``--seeds 42 1 2`` repeats the quality runs with other seeds (data order) and prints each method's
mean and spread over the seeds and its difference to CE only seed by seed; ``--epochs N`` trains N
epochs instead of ``--steps``; ``--extra`` adds overrides to the KD
methods' runs (e.g. ``loss.temperature=2``).

    python benchmarks/cross_tokenizer.py --part step [--steps 6] [--methods marginal]
    python benchmarks/cross_tokenizer.py --part quality [--steps 27] [--json out.json]
    python benchmarks/cross_tokenizer.py --part quality --epochs 2 --methods sft overlap gold --seeds 42 1 2

Timings depend on the CPU and its load: the script prints the CPU and the load averages before and
after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

XTOK = ["+recipe=cross_tokenizer"]
STEP_CONFIGS = {
    "same tokenizer, vanilla (baseline)": ["algorithm=vanilla"],  # BASELINE
    "same tokenizer, overlap": ["algorithm=overlap"],
    "demo tokenizer, overlap": XTOK + ["algorithm=overlap"],
    "demo tokenizer, uld": XTOK + ["algorithm=uld"],
    "demo tokenizer, gold": XTOK + ["algorithm=gold"],
    "demo tokenizer, dskd": XTOK + ["algorithm=dskd"],
    "demo tokenizer, marginal": XTOK + ["algorithm=marginal"],
}
BASELINE = "same tokenizer, vanilla (baseline)"
QUALITY_METHODS = ["overlap", "uld", "gold", "dskd", "marginal", "sft"]


def machine() -> str:
    from kdlib.hardware import bf16_support

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    return f"{cpu}, {os.cpu_count()} CPUs, ATEN_CPU_CAPABILITY={isa}, bf16: {bf16_support('cpu').reason}"


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def run(name: str, overrides: list[str], out: Path) -> tuple[list[dict], dict, float]:
    import kdlib

    cfg = kdlib.compose([*overrides, "logging.progress=false", "logging.plot=false", "save_student=false",
                         f"output_dir={out / re.sub(r'[^A-Za-z0-9]+', '_', name)}"])
    start = time.perf_counter()
    result = kdlib.run(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, {"before": result.eval_before, "after": result.eval_after}, wall


def alignment_seconds_per_sample() -> float:
    """Data side with the aligner minus without it, per training sample."""
    import kdlib
    from kdlib.controller import assembly
    from kdlib.data.cross_tokenizer import ResponseAligner
    from kdlib.data.samples import build_samples

    cfg = kdlib.compose(XTOK)
    student, teacher = assembly.chat_encoders(cfg, with_teacher=True)
    aligner = ResponseAligner(student, teacher, student_model="student", teacher_model="teacher")
    timings = {}
    for label, args in (("with", (teacher, aligner)), ("without", ())):  # without: the student's side only
        start = time.perf_counter()
        samples, _ = build_samples(cfg.data, "train", student, *args)
        timings[label] = (time.perf_counter() - start) / len(samples)
    return timings["with"] - timings["without"]


def timed_steps(name: str, overrides: list[str], steps: int, out: Path) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds of this process, all threads) of each of ``steps`` optimizer steps
    on the same global batches (the seeded data order), run one by one through the pipeline."""
    import kdlib
    from kdlib.runner import built

    cfg = kdlib.compose([*overrides, "data.eval=null", "logging.progress=false", "save_student=false",
                         f"train.max_steps={steps}"])
    wall, cpu = [], []
    with built(cfg, run_dir=out / re.sub(r"[^A-Za-z0-9]+", "_", name)) as loop:
        batches = loop.sample_batches()
        for step in range(1, steps + 1):
            samples = next(batches)
            w0, c0 = time.perf_counter(), time.process_time()
            loop.step(samples, step)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return wall, cpu


def part_step(args, out: Path) -> dict:
    results = {}
    for name, overrides in STEP_CONFIGS.items():
        if name != BASELINE and overrides[-1].removeprefix("algorithm=") not in args.methods:
            continue
        wall, cpu = timed_steps(name, overrides, args.steps, out)
        results[name] = {"wall": statistics.fmean(wall[1:]), "cpu": statistics.fmean(cpu[1:])}
    align = alignment_seconds_per_sample()
    batch = 8  # train.global_batch_size of the recipe
    base = results[BASELINE]
    print(f"\nseconds per optimizer step (8 samples), mean of steps 2..{args.steps}; CPU = this process, all threads")
    print(f"{'configuration':<38}{'wall s':>8}{'CPU s':>8}{'CPU s + alignment':>19}{'ratio (CPU)':>13}")
    for name, r in results.items():
        extra = align * batch if name.startswith("demo") else 0.0
        print(f"{name:<38}{r['wall']:>8.2f}{r['cpu']:>8.2f}{r['cpu'] + extra:>19.2f}{(r['cpu'] + extra) / base['cpu']:>12.2f}x")
    print(f"alignment (the teacher's encoding, both sides' byte offsets, the walk): {align * 1e3:.2f} ms per sample")
    return {"steps": results, "alignment_seconds_per_sample": align}


def part_quality(args, out: Path) -> dict:
    """Every method starts from the same student (same build; the seed only changes the data
    order), so the evaluation before training runs once per seed, with the first method."""
    length = [f"train.epochs={args.epochs}"] if args.epochs else [f"train.max_steps={args.steps}"]
    results: dict[str, dict[int, dict]] = {method: {} for method in args.methods}
    for seed in args.seeds:
        before = None
        for method in args.methods:
            overrides = XTOK + [f"algorithm={method}", *length, f"seed={seed}", f"eval.before={before is None}",
                                *(args.extra if method != "sft" else [])]
            rows, evaluation, wall = run(f"{method}_{seed}", overrides, out)
            before = before or evaluation["before"]
            results[method][seed] = {
                "before": before, "after": evaluation["after"], "wall": wall, "steps": len(rows),
                "step_seconds": statistics.fmean(r["step_seconds"] for r in rows[1:]),
            }
            print(f"{method} seed {seed}: bits per byte {before['bits_per_byte']:.3f} -> "
                  f"{evaluation['after']['bits_per_byte']:.3f} in {wall:.0f} s", flush=True)
    length_text = f"{args.epochs} epochs" if args.epochs else f"{args.steps} steps"
    print(f"\nheld-out bits per byte of the responses after {length_text} (lower is better), seeds {args.seeds}")
    print(f"{'method':<10}{'before':>8}{'after (mean)':>14}{'spread':>8}{'vs CE only':>12}{'teacher':>9}"
          f"{'top-1 at 1:1':>14}{'s/step':>8}{'wall s':>8}")
    for method, by_seed in results.items():
        runs = list(by_seed.values())
        after = [r["after"]["bits_per_byte"] for r in runs]
        spread = statistics.stdev(after) if len(after) > 1 else 0.0
        if "sft" in results and method != "sft":
            diffs = [by_seed[s]["after"]["bits_per_byte"] / results["sft"][s]["after"]["bits_per_byte"] - 1
                     for s in args.seeds]
            versus = f"{statistics.fmean(diffs):+.1%}"
        else:
            versus = "-"
        last = runs[-1]["after"]
        agreement = f"{statistics.fmean(r['after']['top1_agreement'] for r in runs):.1%}" if "top1_agreement" in last else "-"
        teacher = f"{last['teacher_bits_per_byte']:.3f}" if "teacher_bits_per_byte" in last else "-"
        print(f"{method:<10}{runs[0]['before']['bits_per_byte']:>8.3f}{statistics.fmean(after):>14.3f}{spread:>8.3f}"
              f"{versus:>12}{teacher:>9}{agreement:>14}"
              f"{statistics.fmean(r['step_seconds'] for r in runs):>8.2f}{statistics.fmean(r['wall'] for r in runs):>8.0f}")
        print(f"{'':<10}per seed: " + ", ".join(f"{s}: {by_seed[s]['after']['bits_per_byte']:.3f}" for s in args.seeds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["step", "quality"], required=True)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (step: 6, quality: 27)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--epochs", type=int, default=None, help="quality: train this many epochs instead of --steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="quality: one set of runs per seed")
    parser.add_argument("--methods", nargs="+", default=QUALITY_METHODS, choices=QUALITY_METHODS)
    parser.add_argument("--extra", nargs="*", default=[], help="quality: overrides for the KD methods (not sft)")
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.part == "step" else 27)
    print(f"kdlib cross-tokenizer benchmark ({args.part}) | {machine()} | {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        results = (part_step if args.part == "step" else part_quality)(args, Path(tmp))
    print(f"done | {load()}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "steps": args.steps, "epochs": args.epochs, "seeds": args.seeds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
