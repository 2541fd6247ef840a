"""Per-step time breakdown of the distillation pipeline, and bytes on the wire: hidden states vs logits.

Runs the same tiny workload (a random Llama teacher and a pruned student built locally, chat data)
through kdlib with the local launcher and with the Ray launcher (1 teacher worker, 2 FSDP2 student
workers), sequential (pipeline.prefetch=0) and overlapped (prefetch=1), in one process, and prints
the mean per-step seconds of: the whole step, the teacher's busy time, the transport, the students
(slowest worker), and the students' idle time (step minus student time: waiting for the teacher
and the controller). Then the bytes per step the teacher sends (bf16 hidden states at the loss
positions) against what full bf16 teacher logits of the same tokens would be, for this workload and
for real model shapes.

    python benchmarks/pipeline.py [--steps 8] [--vocab 32000] [--hidden 256] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REAL_SHAPES = {  # (hidden size, vocabulary) of teachers people distil from
    "Qwen3-30B-A3B": (2048, 151936),
    "Qwen3-32B": (5120, 151936),
    "Llama-3.1-70B": (8192, 128256),
}


def build_workload(root: Path, vocab: int, hidden: int, teacher_layers: int, rows: int) -> dict[str, str]:
    from kdlib.demo.text import build_model, build_tokenizer, chat_rows, write_jsonl

    build_tokenizer(root / "tok")
    build_model(root / "teacher", tokenizer_dir=root / "tok", vocab_size=vocab, hidden_size=hidden, num_layers=teacher_layers)
    write_jsonl(root / "train.jsonl", chat_rows(rows, seed=0))
    return {"teacher": str(root / "teacher"), "train": str(root / "train.jsonl")}


def run_config(name: str, overrides: list[str], workload: dict[str, str], out: Path, steps: int) -> dict:
    import kdlib

    cfg = kdlib.compose([
        f"teacher.model={workload['teacher']}", f"student.model={workload['teacher']}", "student.num_layers=2",
        "student.autocast=false", "teacher.dtype=float32", f"data.train={workload['train']}", "data.eval=null",
        f"train.max_steps={steps}", "train.global_batch_size=16", "train.micro_batch_size=4",
        "logging.progress=false", "save_student=false", "logging.plot=false", "device=cpu",
        f"output_dir={out / name.replace(', ', '_')}", *overrides,
    ])
    start = time.perf_counter()
    result = kdlib.run(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = rows[2:] if len(rows) > 4 else rows  # the first steps include warm-up
    mean = lambda key: statistics.fmean(r[key] for r in measured)  # noqa: E731
    return {
        "name": name,
        "step": mean("step_seconds"),
        "teacher": mean("teacher_seconds"),
        "transport": mean("transport_seconds"),
        "student": mean("student_seconds"),
        "idle": mean("step_seconds") - mean("student_seconds"),
        "loss_tokens": mean("loss_tokens"),
        "bytes": mean("transport_bytes"),
        "final_loss": rows[-1]["loss"],
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        workload = build_workload(root, args.vocab, args.hidden, args.teacher_layers, rows=16 * args.steps)
        configs = [("local, sequential", [])]
        if not args.skip_ray:
            ray = ["launcher=ray", "transport=ray", "student.num_workers=2", "launcher.num_cpus=2"]
            configs += [
                ("ray, sequential", ray + ["pipeline.prefetch=0"]),
                ("ray, overlapped", ray + ["pipeline.prefetch=1"]),
            ]
        results = [run_config(name, ov, workload, root / "runs", args.steps) for name, ov in configs]

    print(f"\nkdlib pipeline benchmark | {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs | "
          f"teacher: Llama {args.teacher_layers} layers, H={args.hidden}, V={args.vocab}; student: 2 layers; "
          f"16 samples/step; mean over steps 3..{args.steps}")
    header = f"{'configuration':<20}{'step s':>9}{'teacher s':>11}{'transport s':>13}{'student s':>11}{'idle s':>9}{'final loss':>12}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['name']:<20}{r['step']:>9.3f}{r['teacher']:>11.3f}{r['transport']:>13.4f}{r['student']:>11.3f}{r['idle']:>9.3f}{r['final_loss']:>12.5f}")

    tokens = results[0]["loss_tokens"]
    print(f"\nbytes per step ({tokens:.0f} loss tokens per step, bf16 on the wire)")
    print(f"{'teacher shape':<24}{'hidden states':>16}{'full logits':>16}{'ratio':>8}")
    shapes = {f"this workload (H={args.hidden})": (args.hidden, args.vocab), **REAL_SHAPES}
    for name, (hidden, vocab) in shapes.items():
        h_bytes, l_bytes = tokens * hidden * 2, tokens * vocab * 2
        print(f"{name:<24}{_size(h_bytes):>16}{_size(l_bytes):>16}{l_bytes / h_bytes:>7.0f}x")
    measured = results[0]["bytes"]
    print(f"measured on the wire (this workload): {_size(measured)} per step")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "loss_tokens": tokens}, indent=2))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


if __name__ == "__main__":
    main()
