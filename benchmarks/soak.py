"""Soak: a long on-policy run on tiny models, its resident memory followed step by step.

    python benchmarks/soak.py [--steps 300] [--csv soak.csv]

Builds a tiny Llama, a tokenizer and prompts in a temporary directory, then runs ``--steps``
on-policy steps (rollouts, teacher scoring, student update, weight sync, a metrics line each) in
this process with the local launcher, reading the process's resident set size (``VmRSS``) after
every step. A leak shows as RSS growing with the step count; the goal (issue 25) is that RSS at
the end stays within 10% of its value at step 20, once caches and allocator pools have warmed up.
Prints the RSS at a few steps and the ratio end / step 20.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--csv", type=Path, help="write step,rss_mb rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import kdlib
    from kdlib.runner import built
    from kdlib.demo.text import build_model, build_tokenizer, chat_rows, write_jsonl

    with tempfile.TemporaryDirectory(prefix="kdlib-soak-") as tmp:
        root = Path(tmp)
        build_tokenizer(root / "tok")
        build_model(root / "llama", arch="llama", tokenizer_dir=root / "tok", num_layers=4)
        prompts = write_jsonl(root / "prompts.jsonl", chat_rows(64, seed=3))
        cfg = kdlib.compose([
            f"teacher.model={root / 'llama'}", f"student.model={root / 'llama'}", "student.num_layers=2",
            "student.autocast=false", "teacher.dtype=float32", f"data.train={prompts}", "data.eval=null",
            "+recipe=onpolicy", "rollout.max_new_tokens=16", f"train.max_steps={args.steps}",
            "train.global_batch_size=4", "logging.progress=false", "device=cpu", "rollout.print_every=0",
        ])
        series: list[tuple[int, float]] = []
        start = time.perf_counter()
        with built(cfg, run_dir=root / "run") as loop:
            loop.resume()
            loop.start(1)
            batches = loop.sample_batches()
            from kdlib.tracking import MetricsWriter

            writer = MetricsWriter(root / "run")
            for step in range(1, args.steps + 1):
                metrics = loop.step(next(batches), step)
                metrics.pop("bad_sample_ids", None)
                writer.write({**metrics, "step": step})
                gc.collect()
                series.append((step, rss_mb()))
            writer.close()
        seconds = time.perf_counter() - start
    at = dict(series)
    reference = at[min(20, args.steps)]
    end = series[-1][1]
    peak = max(r for _, r in series[19:]) if len(series) > 20 else end
    for step in (1, 10, 20, 50, 100, 150, 200, 250, args.steps):
        if step in at:
            print(f"step {step:4d}: RSS {at[step]:8.1f} MiB")
    print(f"{args.steps} on-policy steps in {seconds:.0f} s; RSS end / step 20 = {end / reference:.3f}, "
          f"peak after step 20 / step 20 = {peak / reference:.3f}")
    if args.csv:
        args.csv.write_text("step,rss_mb\n" + "".join(f"{s},{r:.2f}\n" for s, r in series))
    return 0 if end <= 1.10 * reference else 1


if __name__ == "__main__":
    sys.exit(main())
