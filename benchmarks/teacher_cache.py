"""A loss sweep with and without the offline teacher cache, and what the cache costs on disk.

Runs the same Hydra multirun twice through the ``kdlib`` command, in this one invocation:

    kdlib -m loss=kl,rkl,jsd,tvd <overrides>                      # every job loads and runs the teacher
    kdlib -m loss=kl,rkl,jsd,tvd teacher.cache=DIR <overrides>    # job 1 fills DIR, jobs 2-4 read it

and prints the wall time of each sweep and each job (from the jobs' own "finished in" log line),
the ratio (goal: at most 0.7), the first job's time with and without the cache (what writing it
costs a single run), the cache's bytes per token as measured, and the same figure computed for
larger teachers against full bf16 logits and a top-k=100 logit cache as other frameworks store it.

    python benchmarks/teacher_cache.py                      # the default job (27 steps per job)
    python benchmarks/teacher_cache.py --extra train.max_steps=5 data.eval_max_samples=16   # quick
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOSSES = "kl,rkl,jsd,tvd"
# (name, hidden size, vocabulary) of teachers the cache is computed for.
TEACHERS = [("SmolLM2-135M (embedded)", 576, 49152), ("Qwen3-30B-A3B", 2048, 151936), ("Qwen3-32B", 5120, 151936)]
TOPK = 100


def sweep(extra: list[str], directory: Path) -> tuple[float, list[float]]:
    """Wall seconds of ``kdlib -m loss=...`` and each job's own run time, in job order."""
    cmd = [sys.executable, "-m", "kdlib", "-m", f"loss={LOSSES}", "logging.progress=false",
           f"hydra.sweep.dir={directory}", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    wall = time.perf_counter() - start
    jobs = []
    for job in sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        found = re.search(r"finished in ([0-9.]+) s", (job / "kdlib.log").read_text())
        jobs.append(float(found.group(1)) if found else float("nan"))
    return wall, jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdlib-cache-bench-") as tmp:
        tmp = Path(tmp)
        plain_wall, plain_jobs = sweep(args.extra, tmp / "plain")
        cache_dir = tmp / "teacher_cache"
        cached_wall, cached_jobs = sweep(args.extra + [f"teacher.cache={cache_dir}"], tmp / "cached")
        from kdlib.cache.store import TeacherCache

        cache = TeacherCache.for_reading(cache_dir)  # reads the shards themselves (index.json is optional)
        disk, rows, samples = cache.disk_bytes(), cache.total_rows(), len(cache)

    print(f"\nsweep -m loss={LOSSES} {' '.join(args.extra)}")
    print(f"{'':24}{'wall s':>10}  jobs s")
    print(f"{'without teacher.cache':24}{plain_wall:>10.1f}  {', '.join(f'{j:.1f}' for j in plain_jobs)}")
    print(f"{'with teacher.cache':24}{cached_wall:>10.1f}  {', '.join(f'{j:.1f}' for j in cached_jobs)}")
    print(f"ratio (cache / no cache): {cached_wall / plain_wall:.3f}  (goal <= 0.7)")
    print(f"first job (fills the cache) / first job without: {cached_jobs[0] / plain_jobs[0]:.3f}")
    if rows:
        print(f"cache on disk: {disk / 2**20:.1f} MiB for {samples} samples, {rows} tokens = "
              f"{disk / rows:.0f} bytes per token (measured)")
    print(f"\n{'teacher':26}{'hidden bf16 B/token':>20}{'full bf16 logits':>18}{f'top-{TOPK} (int32 id + fp32 logprob)':>36}")
    for name, hidden, vocab in TEACHERS:
        h, full, topk = hidden * 2, vocab * 2, TOPK * (4 + 4)
        print(f"{name:26}{h:>20,}{full:>12,} ({full / h:4.0f}x){topk:>24,} ({topk / h:4.2f}x)")


if __name__ == "__main__":
    main()
