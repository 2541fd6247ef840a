"""A served teacher's cost: the default job's step with the top-k signal from an OpenAI-compatible
server, against the same step with the in-process hf teacher computing the same signal.

The default job (embedded SmolLM2-135M teacher, its pruned student, the shipped data) is built
twice in this process with ``teacher.signal.kind=topk``: once with ``teacher/backend=hf`` (the
baseline: hidden states turned into top-k in the teacher worker), once with
``teacher/backend=served`` pointed at the tests' loopback ``/v1/completions`` server
(tests/served_double.py) running the same checkpoint in the same dtype on the same cores, which
validates each request and builds each answer with SGLang's own protocol models. After a warm-up
step each, the two runs take turns step by step (so drift of a shared machine hits both); the
script prints each step time, the ratio served / hf, and where the served teacher's time goes:
the server's forward and top-k, the rest of its answer (validation, key rendering, response models,
JSON), the client's parsing, and what remains (HTTP, the wait).

    OMP_NUM_THREADS=1 python benchmarks/served_teacher.py                       # k=20, 4 measured steps
    OMP_NUM_THREADS=1 python benchmarks/served_teacher.py --steps 4 --token-keys text

On a machine shared with other jobs, set OMP_NUM_THREADS=1: OpenMP threads contending with other
processes slow both runs by several times and swamp the difference (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback server


def _timed(owner: type, name: str, totals: dict) -> None:
    """Add the seconds spent in ``owner.name`` to ``totals[name]``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps measured per backend (after one warm-up step)")
    parser.add_argument("--k", type=int, default=20, help="teacher.signal.k")
    parser.add_argument("--token-keys", default="ids", choices=["ids", "text"])
    parser.add_argument("--batch-size", type=int, default=4, help="teacher.backend.batch_size")
    parser.add_argument("--concurrency", type=int, default=2, help="teacher.backend.concurrency")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for both runs")
    args = parser.parse_args()

    import kdlib
    from kdlib.backends.served.teacher import ServedTeacherBackend
    from kdlib.hardware import cpu_capability
    from kdlib.models.loading import model_location
    from kdlib.runner import built
    from served_double import LoopbackServer

    common = ["device=cpu", "logging.progress=false", "eval.before=false", "save_student=false",
              "teacher.signal.kind=topk", f"teacher.signal.k={args.k}", f"train.max_steps={args.steps + 1}", *args.extra]
    tmp = Path(tempfile.mkdtemp(prefix="kdlib-served-bench-"))
    hf_cfg = kdlib.compose(common + [f"output_dir={tmp / 'hf'}"])
    dtype = torch.bfloat16 if hf_cfg.teacher.dtype.value == "bfloat16" else torch.float32
    client_totals: dict[str, float] = {}
    _timed(ServedTeacherBackend, "_read", client_totals)
    with LoopbackServer(model_location(hf_cfg.teacher.model), token_keys=args.token_keys, dtype=dtype) as server:
        served_cfg = kdlib.compose(common + [
            "teacher/backend=served", f"teacher.backend.url={server.url}", f"teacher.backend.token_keys={args.token_keys}",
            f"teacher.backend.batch_size={args.batch_size}", f"teacher.backend.concurrency={args.concurrency}",
            f"output_dir={tmp / 'served'}",
        ])
        with built(hf_cfg) as hf, built(served_cfg) as served:
            runs = {"hf": hf, "served": served}
            batches = {name: mode.sample_batches() for name, mode in runs.items()}
            times: dict[str, list[float]] = {name: [] for name in runs}
            teacher: dict[str, list[float]] = {name: [] for name in runs}
            teacher_rows: list[float] = []
            for name, mode in runs.items():  # warm-up
                mode.start(1)
                mode.step(next(batches[name]), 1)
            backend = served.pipeline.teacher.group.workers[0].backend
            skipped_before = backend.skipped
            before = (server.compute_seconds, server.answer_seconds, server.response_bytes, len(server.requests),
                      client_totals.get("_read", 0.0))
            for step in range(2, args.steps + 2):
                for name, mode in runs.items():
                    start = time.perf_counter()
                    metrics = mode.step(next(batches[name]), step)
                    times[name].append(time.perf_counter() - start)
                    teacher[name].append(metrics["teacher_seconds"])
                    if name == "served":
                        teacher_rows.append(metrics["loss_tokens"])
            skipped, rows = backend.skipped - skipped_before, sum(teacher_rows)
            compute, answer, sent, requests, parse = (now - then for now, then in zip(
                (server.compute_seconds, server.answer_seconds, server.response_bytes, len(server.requests),
                 client_totals.get("_read", 0.0)), before))

    steps = args.steps
    print(f"CPU: {cpu_capability()}; torch threads {torch.get_num_threads()}; teacher dtype {dtype}; "
          f"k={args.k}, token_keys={args.token_keys}, batch_size={args.batch_size}, concurrency={args.concurrency}")
    print(f"{'backend':<8} {'step s (mean)':>14} {'min':>7} {'max':>7} {'teacher s (mean)':>17}")
    for name in runs:
        t = times[name]
        print(f"{name:<8} {statistics.mean(t):>14.3f} {min(t):>7.3f} {max(t):>7.3f} {statistics.mean(teacher[name]):>17.3f}")
    ratio = statistics.mean(times["served"]) / statistics.mean(times["hf"])
    teacher_ratio = statistics.mean(teacher["served"]) / statistics.mean(teacher["hf"])
    print(f"step time served / hf: {ratio:.3f}x   teacher time served / hf: {teacher_ratio:.3f}x")
    served_teacher = sum(teacher["served"]) / steps
    print(f"served teacher per step: {served_teacher:.3f} s = server forward+top-k {compute / steps:.3f} s"
          f" + server protocol (validation, keys, models, JSON) {(answer - compute) / steps:.3f} s"
          f" + client parsing {parse / steps:.3f} s + HTTP and waiting {served_teacher - answer / steps - parse / steps:.3f} s;"
          f" {requests / steps:.1f} requests, {sent / steps / 1e6:.2f} MB of answers per step")
    if args.token_keys == "text":
        print(f"top-k entries left out (their text names several ids): {skipped} of "
              f"{rows:.0f} loss positions x k={args.k} in the measured steps")


if __name__ == "__main__":
    main()
