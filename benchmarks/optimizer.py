"""AdamW's update of a real student, per implementation (``train.adamw_impl``), timed without a profiler.

``step.py`` times its phases inside ``torch.profiler``, whose per-operator cost inflates an
implementation that launches thousands of small operators (torch's per-parameter loop) more than
one that launches a few (the fused kernel). This script times ``optimizer.step()`` alone with a
wall clock, on the default job's student (16 of SmolLM2-135M's 30 layers) or issue 14's (10
layers), with gradients of a realistic size set on every parameter, implementations interleaved,
and prints the median of each and its ratio to torch's loop:

    python benchmarks/optimizer.py                 # 16-layer student
    python benchmarks/optimizer.py --layers 10     # issue 14's student
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdlib
from kdlib.config.schema import TrainConfig
from kdlib.models.student import build_student
from kdlib.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers kept in the default job's student")
    parser.add_argument("--impls", default="for_loop,foreach,auto", help="train.adamw_impl values, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 8 timed steps each")
    args = parser.parse_args()

    student_cfg = kdlib.compose([f"student.num_layers={args.layers}", "student.dtype=float32"]).student
    model = build_student(student_cfg, torch.device("cpu")).model
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, student: {args.layers} layers, {n_params / 1e6:.1f} M parameters")

    impls = args.impls.split(",")
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            optimizer = build_optimizer(model, TrainConfig(adamw_impl=impl))
            optimizer.step()  # creates the state
            for _ in range(8):
                start = time.perf_counter()
                optimizer.step()
                times[impl].append(time.perf_counter() - start)
    baseline = statistics.median(times[impls[0]])
    print(f"{'adamw_impl':10} {'ms/step':>8} {'vs ' + impls[0]:>14}")
    for impl in impls:
        median = statistics.median(times[impl])
        print(f"{impl:10} {1e3 * median:8.1f} {baseline / median:13.2f}x")


if __name__ == "__main__":
    main()
