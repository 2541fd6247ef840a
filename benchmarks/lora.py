"""LoRA vs full fine-tuning of the student on the default job, at equal steps.

Runs the embedded default job (SmolLM2-135M teacher, its 16-layer pruned copy as student) for a
few steps (``+recipe=quickstart``: 5 steps, 16 held-out conversations), once with full fine-tuning
and once per LoRA setting, each in a fresh process, and prints per configuration: trainable
parameters, optimizer-state bytes (AdamW's two moments, measured on the optimizer), seconds per
step (mean over steps 2..N), the process's peak resident memory (VmHWM: teacher, student, data
and evaluation all live in this one process with the local launcher), and the held-out
KL(teacher || student), student CE and top-1 agreement after training. The CPU model, whether it
has AVX-512-BF16 and the load average before and after are printed with the figures.

    python benchmarks/lora.py [--steps 5] [--rank 16] [--lora-lr 5e-4 5e-3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from pathlib import Path
import kdlib
from kdlib.runner import built

overrides, run_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
run_dir.mkdir(parents=True, exist_ok=True)
cfg = kdlib.compose(overrides)
with built(cfg, run_dir) as loop:
    result = loop.run()
    stats = loop.pipeline.students.parameter_stats()
rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print("RESULT " + json.dumps({
    "rows": rows, "eval_before": result.eval_before, "eval_after": result.eval_after,
    "parameters": sum(s["parameters"] for s in stats),
    "trainable_parameters": sum(s["trainable_parameters"] for s in stats),
    "optimizer_state_bytes": sum(s["optimizer_state_bytes"] for s in stats),
    "peak_rss_kib": int(status["VmHWM"].split()[0]),
}))
"""


def run_config(name: str, overrides: list[str], steps: int, root: Path) -> dict:
    args = ["+recipe=quickstart", f"train.max_steps={steps}", "logging.progress=false", "logging.plot=false",
            "save_student=false", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args), str(root / name.replace(" ", "_"))],
                         capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    rows = result["rows"]
    result["name"] = name
    result["overrides"] = overrides
    result["seconds_per_step"] = statistics.fmean(r["step_seconds"] for r in rows[1:]) if len(rows) > 1 else rows[0]["step_seconds"]
    result["student_seconds_per_step"] = statistics.fmean(r["student_seconds"] for r in rows[1:]) if len(rows) > 1 else rows[0]["student_seconds"]
    result["final_loss"] = rows[-1]["loss"]
    return result


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    kind = "AVX-512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"{model}, {os.cpu_count()} CPUs, {kind}" + (f" (ATEN_CPU_CAPABILITY={forced})" if forced else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lora-lr", type=float, nargs="+", default=[5e-4, 5e-3],
                        help="learning rates of the LoRA runs (the default job's own is 5e-4)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    configs = [("full fine-tuning", [])]
    for lr in args.lora_lr:
        configs.append((f"LoRA r={args.rank} lr={lr:g}",
                        [f"student.lora.r={args.rank}", f"student.lora.alpha={args.alpha}", f"train.lr={lr}"]))
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_config(name, overrides, args.steps, Path(tmp)) for name, overrides in configs]
    load_after = os.getloadavg()

    before = results[0]["eval_before"]
    print(f"\nkdlib LoRA benchmark | {cpu_description()} | default job, {args.steps} steps (+recipe=quickstart) | "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    header = (f"{'configuration':<24}{'trainable':>12}{'optim state':>13}{'s/step':>8}{'student s':>10}{'peak RSS':>10}"
              f"{'KL after':>10}{'CE after':>10}{'top-1':>8}")
    print(header)
    print("-" * len(header))
    print(f"{'(before training)':<24}{'':>12}{'':>13}{'':>8}{'':>10}{'':>10}{before['kl']:>10.3f}{before['ce']:>10.3f}"
          f"{before['top1_agreement']:>8.1%}")
    for r in results:
        after = r["eval_after"]
        print(f"{r['name']:<24}{r['trainable_parameters'] / 1e6:>11.2f}M{r['optimizer_state_bytes'] / 2**20:>10.1f}MiB"
              f"{r['seconds_per_step']:>8.2f}{r['student_seconds_per_step']:>10.2f}{r['peak_rss_kib'] / 2**20:>7.2f}GiB"
              f"{after['kl']:>10.3f}{after['ce']:>10.3f}{after['top1_agreement']:>8.1%}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_description(), "load_before": load_before, "load_after": load_after,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
